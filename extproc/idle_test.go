package extproc_test

import (
	"context"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/internal/poll"
)

// Messages a peer sends on an ext_proc stream in the idle tests.
var (
	idleHeaders = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
		Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: ":method", RawValue: []byte("POST")}, {Key: ":path", RawValue: []byte("/v1/chat/completions")}}}}}}
	idleModelHeaders = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
		Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: ":method", RawValue: []byte("POST")}, {Key: extproc.HeaderModel, RawValue: []byte("llama")}}}}}}
	idleBody        = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: chat("llama"), EndOfStream: true}}}
	idleRespHeaders = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{
		Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: ":status", RawValue: []byte("200")}}}}}}
)

// TestIdleStreams: a peer that opens ext_proc streams and leaves them
// silent where Envoy's own idle timer would have ended a real request
// (before the request headers; admitted on its body, before the response
// headers) gets them ended, and whatever they held (a slot) back. Where
// silence is a real request's (the client still uploading its body, a
// request admitted at its headers whose body streams upstream, a response
// that has begun) no bound applies. Such a peer is not Envoy, which ends
// every request it gives up on; so the test speaks raw gRPC.
func TestIdleStreams(t *testing.T) {
	const bound = 100 * time.Millisecond
	for _, tc := range []struct {
		name     string
		send     []*extprocv3.ProcessingRequest
		holds    int  // slots held while silent
		survives bool // the stream stays open however long it is silent
	}{
		{name: "nothing sent", send: nil},
		{name: "headers, the body still uploading", send: []*extprocv3.ProcessingRequest{idleHeaders}, survives: true},
		{name: "admitted on its body, no response", send: []*extprocv3.ProcessingRequest{idleHeaders, idleBody}, holds: 1},
		{name: "admitted at its headers, no response", send: []*extprocv3.ProcessingRequest{idleModelHeaders}, holds: 1, survives: true},
		{name: "response begun", send: []*extprocv3.ProcessingRequest{idleHeaders, idleBody, idleRespHeaders}, holds: 1, survives: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// vgw's clock moves only when the test says: silence lasts
			// exactly as long as the test makes it.
			clock := clockwork.NewFakeClock()
			h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Second)}}, extproc.Options{StreamIdleTimeout: bound, Clock: clock, TrustModelHeader: true})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			stream, err := extprocv3.NewExternalProcessorClient(h.conn).Process(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range tc.send {
				if err := stream.Send(m); err != nil {
					t.Fatal(err)
				}
				if _, err := stream.Recv(); err != nil {
					t.Fatalf("no answer to %T: %v", m.GetRequest(), err)
				}
			}
			if got := h.stats(t, "llama").InFlight; got != tc.holds {
				t.Fatalf("in flight %d while silent, want %d", got, tc.holds)
			}
			ended := make(chan error, 1)
			go func() { _, err := stream.Recv(); ended <- err }()
			if tc.survives {
				// vgw goes back to waiting for Envoy with no bound armed: a
				// wrongly armed one would show within the second.
				short, stop := context.WithTimeout(ctx, time.Second)
				defer stop()
				if clock.BlockUntilContext(short, 1) == nil {
					t.Fatal("a bound is armed on a silence that is a real request's")
				}
				clock.Advance(5 * bound)
				select {
				case err := <-ended:
					t.Fatalf("the stream was ended after its silence: %v", err)
				default:
				}
				if got := h.stats(t, "llama").InFlight; got != tc.holds {
					t.Fatalf("in flight %d, want the %d slots still held", got, tc.holds)
				}
				cancel() // the request ends: what it held comes back
				h.idle(t, "llama")
				if got := h.srv.IdleClosed(); got != 0 {
					t.Errorf("IdleClosed %d, want 0", got)
				}
				return
			}
			// vgw waits for the next message with the bound armed.
			if err := clock.BlockUntilContext(ctx, 1); err != nil {
				t.Fatal(err)
			}
			clock.Advance(bound - time.Nanosecond)
			select {
			case err := <-ended:
				t.Fatalf("ended before the bound: %v", err)
			default:
			}
			clock.Advance(time.Nanosecond)
			select {
			case err := <-ended:
				if status.Code(err) != codes.DeadlineExceeded {
					t.Fatalf("the silent stream ended with %v, want DeadlineExceeded", err)
				}
			case <-time.After(time.Minute):
				t.Fatal("a silent stream was never ended")
			}
			h.idle(t, "llama")
			// The peer hears of the end (gRPC answers the failed receive)
			// as the watch counts it.
			poll.Until(t, "the ended stream is counted", func() bool { return h.srv.IdleClosed() == 1 })
		})
	}
}

// TestIdleBoundSparesVgwsOwnWaits: a request queued for a slot is vgw's
// to answer, not Envoy's: however long it waits, the bound does not end
// it, and it is admitted when the slot frees.
func TestIdleBoundSparesVgwsOwnWaits(t *testing.T) {
	const bound = 100 * time.Millisecond
	clock := clockwork.NewFakeClock()
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(1, 4, time.Hour)}}, extproc.Options{StreamIdleTimeout: bound, Clock: clock})
	a, doneA := h.streaming(t, context.Background(), "a", "llama")
	// An unbuffered send returns once Envoy has taken the chunk: a's
	// response has begun, so a has no bound armed either.
	a.chunks <- []byte("data: {}\n\n")
	doneB := h.async(t, context.Background(), req("b", chat("llama")))
	poll.Until(t, "b is queued", func() bool { return h.stats(t, "llama").Queued == 1 })
	clock.Advance(100 * bound)
	select {
	case res := <-doneB:
		t.Fatalf("b ended while queued: %d %s", res.Status, res.Details)
	default:
	}
	close(a.chunks)
	<-doneA
	if res := <-doneB; res.Status != 200 {
		t.Fatalf("b once a's slot freed: %d %s", res.Status, res.Details)
	}
	h.idle(t, "llama")
	if got := h.srv.IdleClosed(); got != 0 {
		t.Errorf("IdleClosed %d, want 0", got)
	}
}
