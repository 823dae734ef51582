package extproc_test

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/internal/poll"
)

// TestEnvoyIdleTimer: Envoy's stream idle timer runs from the request's
// last byte through vgw's queue, and again from vgw's answer, which sends
// the body on to the model (filter_manager.cc decodeData restarts it),
// through the model's time to its first byte: for a non-streamed answer,
// the whole generation. Each stretch must fit stream_idle_timeout, which
// is why vgw's config insists on it covering max_message_timeout and
// first_byte_budget. Whatever Envoy does, vgw gives the slot back.
func TestEnvoyIdleTimer(t *testing.T) {
	for _, tc := range []struct {
		name              string
		idle              time.Duration
		waited, generated time.Duration // on Envoy's clock
		status            int
		detail            string
		// cutWhileQueued: the timer runs out while vgw still holds the
		// request; else it runs out, if at all, upstream.
		cutWhileQueued bool
	}{
		{name: "960s covers a 14m wait and a 14m generation", idle: 960 * time.Second, waited: 14 * time.Minute, generated: 14 * time.Minute, status: 200},
		{name: "a generation longer than 960s is cut", idle: 960 * time.Second, waited: time.Minute, generated: 17 * time.Minute, status: 504, detail: extproctest.DetailIdleTimeout},
		// Envoy's local 504 reaches vgw as response_headers while vgw still
		// owes the body's answer; vgw, holding the request and reading
		// nothing, does not answer, so ext_proc's own 504 goes out
		// (filter_manager.cc sendDirectLocalReply) and vgw sees the stream
		// reset.
		{name: "Envoy's default 5m cuts a 6m wait", idle: 5 * time.Minute, waited: 6 * time.Minute, status: 504, detail: extproctest.DetailMessageTimeout, cutWhileQueued: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, []extproc.Model{{Name: "llama", Limits: limits(1, 4, 20*time.Minute)}})
			a, doneA := h.streaming(t, context.Background(), "a", "llama")

			clock := clockwork.NewFakeClock()
			f := repoFilter(t)
			f.Clock, f.StreamIdleTimeout = clock, tc.idle
			arrived, answer, cancelled := make(chan struct{}), make(chan struct{}), make(chan struct{})
			env := extproctest.New(h.conn, f, func(ctx context.Context, fwd *extproctest.Forwarded) (*extproctest.Response, error) {
				close(arrived)
				select {
				case <-answer:
					return &extproctest.Response{Status: 200, Headers: []extproctest.Header{{Key: "content-type", Value: "application/json"}}, Body: []byte(`{"choices":[]}`)}, nil
				case <-ctx.Done():
					close(cancelled) // Envoy reset the upstream request
					return nil, ctx.Err()
				}
			})
			doneB := make(chan *extproctest.Result, 1)
			go func() {
				res, err := env.Do(context.Background(), req("b", chat("llama")))
				if err != nil {
					t.Errorf("Envoy: %v", err)
				}
				doneB <- res
			}()
			poll.Until(t, "b is queued and has its override", func() bool { return h.stats(t, "llama").Queued == 1 && env.Overrides() == 1 })
			clock.Advance(tc.waited)

			var res *extproctest.Result
			if tc.cutWhileQueued {
				// The idle timer fired within Advance; the response_headers
				// call it makes then runs under a message timer of its own,
				// beside the body call's: wait for it, and let it run out.
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				if err := clock.BlockUntilContext(ctx, 2); err != nil {
					t.Fatal("the local reply's response_headers were never sent")
				}
				clock.Advance(f.MessageTimeout)
				res = awaitResult(t, doneB)
				poll.Until(t, "vgw sees b leave", func() bool { return h.stats(t, "llama").Queued == 0 })
				close(a.chunks)
			} else {
				close(a.chunks) // a ends: b gets the slot and goes upstream
				awaitClosed(t, arrived, "b reaches the upstream")
				clock.Advance(tc.generated)
				if tc.status == 200 {
					close(answer)
				} else {
					awaitClosed(t, cancelled, "Envoy resets b's upstream request")
				}
				res = awaitResult(t, doneB)
			}
			<-doneA
			if res.Status != tc.status || res.Details != tc.detail {
				t.Fatalf("status %d (%q) body %q, want %d (%q)", res.Status, res.Details, res.Body, tc.status, tc.detail)
			}
			if res.TimedOut != (tc.status != 200) {
				t.Errorf("TimedOut %v", res.TimedOut)
			}
			if tc.status != 200 {
				// The local reply passed ext_proc's encoder side.
				if !slices.Contains(res.Sent, "response_headers") {
					t.Errorf("Envoy sent %v: its local reply never reached vgw", res.Sent)
				}
			}
			h.idle(t, "llama")
			// vgw hears how each admitted request ended: a's 200, and b's
			// status, Envoy's 504 included; b never admitted, none.
			want := []int{200, tc.status}
			if tc.cutWhileQueued {
				want = want[:1]
			}
			if got := observed(t, h, len(want)); !slices.Equal(got, want) {
				t.Errorf("vgw observed %v, want %v", got, want)
			}
		})
	}
}

// awaitResult waits for a request's result, failing the test if it never
// comes.
func awaitResult(t *testing.T, done <-chan *extproctest.Result) *extproctest.Result {
	t.Helper()
	select {
	case res := <-done:
		return res
	case <-time.After(time.Minute):
		t.Fatal("no result")
		return nil
	}
}

// awaitClosed waits for ch to close, failing the test if it never does.
func awaitClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(time.Minute):
		t.Fatalf("timed out waiting until %s", what)
	}
}

// observed waits until the manager has heard of n requests, and returns
// their statuses in order.
func observed(t *testing.T, h *harness, n int) []int {
	t.Helper()
	var got []int
	poll.Until(t, "the requests observed", func() bool {
		h.leases.mu.Lock()
		defer h.leases.mu.Unlock()
		got = got[:0]
		for _, o := range h.leases.observed {
			got = append(got, o.res.Status)
		}
		return len(got) >= n
	})
	return got
}

// TestEnvoyLocalReplyReachesVgw: Envoy's own replies pass ext_proc's
// encoder side (filter_manager.cc sendLocalReplyViaFilterChain): vgw is
// sent response_headers for them and answers. A 413 for a body over
// Envoy's buffer takes no slot; an upstream that cannot be reached (UH/UF,
// router.cc) ends the admitted request with 503, which the manager hears.
func TestEnvoyLocalReplyReachesVgw(t *testing.T) {
	huge := append([]byte(`{"model":"llama","prompt":"`), make([]byte, 9<<20)...)
	unreachable := func(context.Context, *extproctest.Forwarded) (*extproctest.Response, error) {
		return nil, errors.New("connection refused")
	}
	for _, tc := range []struct {
		name     string
		req      extproctest.Request
		upstream extproctest.Upstream
		status   int
		detail   string
		sent     []string
		observed []int // what the manager hears
	}{
		{name: "body over Envoy's buffer", req: extproctest.Request{Body: huge, Chunked: true}, status: 413, detail: extproctest.DetailBodyTooLarge,
			sent: []string{"request_headers", "response_headers"}},
		{name: "no healthy upstream", req: req("u", chat("llama")), upstream: unreachable, status: 503, detail: extproctest.DetailNoUpstream,
			sent: []string{"request_headers", "request_body", "response_headers"}, observed: []int{503}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, []extproc.Model{{Name: "llama", Limits: limits(1, 1, time.Second)}})
			env := h.env
			if tc.upstream != nil {
				f := repoFilter(t)
				f.Clock = h.clock
				env = extproctest.New(h.conn, f, tc.upstream)
			}
			res, err := env.Do(context.Background(), tc.req)
			if err != nil {
				t.Fatal(err)
			}
			if res.Status != tc.status || res.Details != tc.detail {
				t.Fatalf("status %d (%s), want Envoy's %d (%s)", res.Status, res.Details, tc.status, tc.detail)
			}
			if !slices.Equal(res.Sent, tc.sent) {
				t.Fatalf("Envoy sent %v, want %v", res.Sent, tc.sent)
			}
			if got := res.Get("x-vgw-queue-depth"); got != "0" {
				t.Errorf("vgw's answer to the response headers set x-vgw-queue-depth %q, want 0", got)
			}
			h.idle(t, "llama")
			if len(tc.observed) > 0 {
				if got := observed(t, h, len(tc.observed)); !slices.Equal(got, tc.observed) {
					t.Errorf("the manager heard %v, want %v", got, tc.observed)
				}
			}
		})
	}
}

// processor is an ext_proc server that does what a test says.
type processor func(extprocv3.ExternalProcessor_ProcessServer) error

func (p processor) Process(srv extprocv3.ExternalProcessor_ProcessServer) error { return p(srv) }

// serveProcessor runs p on a loopback listener, or, for nil, returns an
// address where nothing listens.
func serveProcessor(t *testing.T, p processor) *grpc.ClientConn {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if p == nil {
		lis.Close() // nothing listens there now
	} else {
		g := grpc.NewServer()
		extprocv3.RegisterExternalProcessorServer(g, p)
		go g.Serve(lis)
		t.Cleanup(g.Stop)
	}
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestEnvoyFailsOpen: with failure_mode_allow, an Envoy whose processor
// cannot be reached, fails, stays silent past message_timeout or answers
// out of turn sends the request on unprocessed (ext_proc.cc openStream,
// onGrpcError, onMessageTimeout, onReceiveMessage), routed by whatever the
// client sent; failing closed it answers 500, or 504 for the timeout. The
// shipped bootstrap fails closed, and envoy-check refuses fail-open, for
// this reason.
func TestEnvoyFailsOpen(t *testing.T) {
	for _, tc := range []struct {
		name      string
		processor processor
		closed    int // the status failing closed
		timesOut  bool
	}{
		{name: "unreachable", closed: 500},
		{name: "gRPC error", processor: func(srv extprocv3.ExternalProcessor_ProcessServer) error {
			srv.Recv()
			return status.Error(codes.Internal, "broken")
		}, closed: 500},
		{name: "silent", processor: func(srv extprocv3.ExternalProcessor_ProcessServer) error {
			<-srv.Context().Done()
			return nil
		}, closed: 504, timesOut: true},
		{name: "out of turn", processor: func(srv extprocv3.ExternalProcessor_ProcessServer) error {
			srv.Recv()
			srv.Send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: &extprocv3.HeadersResponse{}}})
			<-srv.Context().Done()
			return nil
		}, closed: 500},
	} {
		for _, allow := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s, failure_mode_allow %v", tc.name, allow), func(t *testing.T) {
				conn := serveProcessor(t, tc.processor)
				clock := clockwork.NewFakeClock()
				f := repoFilter(t)
				f.Clock, f.FailureModeAllow = clock, allow
				// Without the shipped removal of clients' x-vgw-* headers,
				// to show what failing open alone would do.
				f.StripHeader = nil
				env := extproctest.New(conn, f, newUpstreams().serve)
				r := req("x", chat("llama"))
				r.Headers = append(r.Headers, extproctest.Header{Key: "x-vgw-cluster", Value: "chosen-by-the-client"})
				done := make(chan *extproctest.Result, 1)
				go func() {
					res, err := env.Do(context.Background(), r)
					if err != nil {
						t.Error(err)
					}
					done <- res
				}()
				if tc.timesOut {
					// The idle timer and the request headers' message timer.
					ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
					defer cancel()
					if err := clock.BlockUntilContext(ctx, 2); err != nil {
						t.Fatal(err)
					}
					clock.Advance(f.MessageTimeout)
				}
				res := awaitResult(t, done)
				switch {
				case !allow && (res.Status != tc.closed || res.Forwarded != nil || res.Bypassed):
					t.Errorf("failing closed: status %d (%s) forwarded %v, want %d and nothing sent", res.Status, res.Details, res.Forwarded, tc.closed)
				case allow && (res.Status != 200 || !res.Bypassed || res.Forwarded == nil || res.Forwarded.Cluster != "chosen-by-the-client"):
					t.Errorf("failing open: status %d (%s) bypassed %v forwarded %+v, want 200 routed by the client's header", res.Status, res.Details, res.Bypassed, res.Forwarded)
				}
			})
		}
	}
}

// TestEnvoyClosesStream: when Envoy closes the ext_proc stream, which is
// when vgw frees the slot of an admitted request, depends on the modes,
// the response, and whether the request direction is done with the
// processor: the stream closes early only once both are (ext_proc.cc
// closeGrpcStreamIfLastRespReceived, noMoreExternalProcess;
// processor_state.cc isLastResponseAfterHeaderResp). A buffered request
// body's reply never ends its direction (eosSeenInBody), so a request
// admitted on its body holds the stream, and its slot, until the HTTP
// stream ends (onDestroy); one admitted at its headers (x-vgw-model,
// its body then not processed) can close at the response headers.
func TestEnvoyClosesStream(t *testing.T) {
	complete := func(context.Context, *extproctest.Forwarded) (*extproctest.Response, error) {
		return &extproctest.Response{Status: 200, Body: []byte(`{"choices":[]}`)}, nil
	}
	streamed := func(context.Context, *extproctest.Forwarded) (*extproctest.Response, error) {
		ch := make(chan []byte, 2)
		ch <- []byte("data: {}\n\n")
		close(ch)
		return &extproctest.Response{Status: 200, Body: []byte("data: {}\n\n"), Stream: ch}, nil
	}
	for _, tc := range []struct {
		name         string
		respBody     filterv3.ProcessingMode_BodySendMode
		respTrailers filterv3.ProcessingMode_HeaderSendMode
		upstream     extproctest.Upstream
		atHeaders    bool // the request names its model in x-vgw-model
		model        string
		closed       string
		noRespHeader bool // response_header_mode SKIP
	}{
		{name: "shipped modes, admitted on the body", respBody: filterv3.ProcessingMode_NONE, respTrailers: filterv3.ProcessingMode_SEND, upstream: complete, closed: "destroy"},
		{name: "shipped modes, admitted at the headers, whole body with the headers", respBody: filterv3.ProcessingMode_NONE, respTrailers: filterv3.ProcessingMode_SEND, upstream: complete, atHeaders: true, closed: "response_headers"},
		{name: "shipped modes, admitted at the headers, streamed body", respBody: filterv3.ProcessingMode_NONE, respTrailers: filterv3.ProcessingMode_SEND, upstream: streamed, atHeaders: true, closed: "destroy"},
		{name: "trailers SKIP, admitted at the headers, streamed body", respBody: filterv3.ProcessingMode_NONE, respTrailers: filterv3.ProcessingMode_SKIP, upstream: streamed, atHeaders: true, closed: "response_headers"},
		{name: "trailers SKIP, admitted on the body", respBody: filterv3.ProcessingMode_NONE, respTrailers: filterv3.ProcessingMode_SKIP, upstream: streamed, closed: "destroy"},
		{name: "STREAMED body, admitted at the headers", respBody: filterv3.ProcessingMode_STREAMED, respTrailers: filterv3.ProcessingMode_SEND, upstream: streamed, atHeaders: true, closed: "response_body"},
		// A buffered body's reply never counts as the end (ext_proc.cc
		// eosSeenInBody).
		{name: "BUFFERED body, admitted at the headers", respBody: filterv3.ProcessingMode_BUFFERED, respTrailers: filterv3.ProcessingMode_SEND, upstream: complete, atHeaders: true, closed: "destroy"},
		// With no response processing, encodeHeaders closes the stream, but
		// only once the request direction is done too.
		{name: "no response processing, admitted on the body", respBody: filterv3.ProcessingMode_NONE, respTrailers: filterv3.ProcessingMode_SKIP, noRespHeader: true, upstream: complete, closed: "destroy"},
		{name: "rejected at the body", respBody: filterv3.ProcessingMode_NONE, respTrailers: filterv3.ProcessingMode_SEND, upstream: complete, model: "nope", closed: "request_body"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, []extproc.Model{{Name: "llama", Limits: limits(1, 1, time.Second)}}, extproc.Options{TrustModelHeader: true})
			f := repoFilter(t)
			f.StripHeader = func(k string) bool { return k == extproc.HeaderCluster } // x-vgw-model trusted
			f.Clock = h.clock
			f.Mode.ResponseBodyMode, f.Mode.ResponseTrailerMode = tc.respBody, tc.respTrailers
			if tc.noRespHeader {
				f.Mode.ResponseHeaderMode = filterv3.ProcessingMode_SKIP
			}
			model := cmp.Or(tc.model, "llama")
			r := req("c", chat(model))
			if tc.atHeaders {
				r.Headers = append(r.Headers, extproctest.Header{Key: "x-vgw-model", Value: model})
			}
			res, err := extproctest.New(h.conn, f, tc.upstream).Do(context.Background(), r)
			if err != nil {
				t.Fatal(err)
			}
			if res.Closed != tc.closed {
				t.Fatalf("Envoy closed the stream at %q (sent %v), want %q", res.Closed, res.Sent, tc.closed)
			}
			h.idle(t, "llama")
		})
	}
}

// TestEnvoyIdleTimerMidResponse: once the response has begun, each chunk
// restarts Envoy's idle timer, and a stream that then goes quiet for
// stream_idle_timeout is reset (conn_manager_impl.cc onIdleTimeout):
// vgw frees the slot when Envoy destroys the stream.
func TestEnvoyIdleTimerMidResponse(t *testing.T) {
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(1, 1, time.Second)}})
	idle := repoFilter(t).StreamIdleTimeout
	a, done := h.streaming(t, context.Background(), "a", "llama")
	send := func() {
		t.Helper()
		select {
		case a.chunks <- []byte("data: {}\n\n"):
		case res := <-done:
			t.Fatalf("the response ended early: %d timed out %v (%s)", res.Status, res.TimedOut, res.Details)
		}
	}
	// The first chunk is taken once the response headers' call is over:
	// from then on only the idle timer runs on the clock. The next come
	// every half timeout, less a second. A send returns once the harness
	// has the chunk, maybe before it restarted the timer, so at most two
	// steps (under one timeout) run on an old start; the three steps
	// without a restart would have run out.
	send()
	for range 3 {
		h.clock.Advance(idle/2 - time.Second)
		send()
	}
	if st := h.stats(t, "llama"); st.InFlight != 1 {
		t.Fatalf("in flight %d while the response streams, want 1", st.InFlight)
	}
	// Then nothing comes: the timer runs out a timeout after the last
	// chunk's restart, which the test cannot see, so the clock moves on
	// in steps until it has.
	var res *extproctest.Result
	for deadline := time.Now().Add(time.Minute); res == nil; {
		if time.Now().After(deadline) {
			t.Fatal("no result")
		}
		select {
		case res = <-done:
		case <-time.After(time.Millisecond): // polling interval
			h.clock.Advance(idle / 2)
		}
	}
	if !res.TimedOut || res.Details != extproctest.DetailIdleTimeout || res.Status != 200 || len(res.Body) != 4*len("data: {}\n\n") {
		t.Fatalf("status %d timed out %v (%s) body %q, want a 200 cut by the idle timer after 4 chunks", res.Status, res.TimedOut, res.Details, res.Body)
	}
	h.idle(t, "llama")
}
