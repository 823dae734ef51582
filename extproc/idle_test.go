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
)

// TestIdleStreams: a peer that opens ext_proc streams and leaves them
// silent before the response begins gets them ended, and whatever they
// held (a slot) back; once the response has begun, silence is the normal
// state of a streamed response and the stream is left alone. Such a peer
// is not Envoy, which ends every request it gives up on; so the test
// speaks raw gRPC.
func TestIdleStreams(t *testing.T) {
	const bound = 100 * time.Millisecond
	headers := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
		Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: ":method", RawValue: []byte("POST")}, {Key: ":path", RawValue: []byte("/v1/chat/completions")}}}}}}
	body := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: chat("llama"), EndOfStream: true}}}
	respHeaders := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{
		Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: ":status", RawValue: []byte("200")}}}}}}
	for _, tc := range []struct {
		name     string
		send     []*extprocv3.ProcessingRequest
		holds    int  // slots held while silent
		survives bool // the stream stays open however long it is silent
	}{
		{name: "nothing sent", send: nil},
		{name: "headers, no body", send: []*extprocv3.ProcessingRequest{headers}},
		{name: "admitted, no response", send: []*extprocv3.ProcessingRequest{headers, body}, holds: 1},
		{name: "response begun", send: []*extprocv3.ProcessingRequest{headers, body, respHeaders}, holds: 1, survives: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// vgw's clock moves only when the test says: silence lasts
			// exactly as long as the test makes it.
			clock := clockwork.NewFakeClock()
			h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Second)}}, extproc.WithStreamIdleTimeout(bound), extproc.WithClock(clock))
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
				// The bound was last disarmed before vgw answered the
				// response headers, and is not armed again.
				clock.Advance(5 * bound)
				select {
				case err := <-ended:
					t.Fatalf("a stream whose response had begun was ended after its silence: %v", err)
				case <-time.After(100 * time.Millisecond): // a wrongly armed bound would have fired by now
				}
				if got := h.stats(t, "llama").InFlight; got != 1 {
					t.Fatalf("in flight %d, want the streaming response's slot held", got)
				}
				cancel() // the response ends: the slot comes back
			} else {
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
				case <-time.After(30 * time.Second):
					t.Fatal("a silent stream was never ended")
				}
			}
			h.idle(t, "llama")
			if tc.survives {
				return
			}
			// The peer hears of the end (gRPC answers the failed receive)
			// as the handler goes on to count it.
			eventually(t, "the ended stream is counted", func() bool { return h.srv.IdleClosed() == 1 })
		})
	}
}
