package extproc_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"

	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/internal/poll"
)

func chat(model string) []byte {
	return []byte(`{"messages":[{"role":"user","content":"Say \"model\" twice."}],"stream":true,"model":"` + model + `"}`)
}

func req(id string, body []byte) extproctest.Request {
	return extproctest.Request{Headers: []extproctest.Header{{Key: "x-request-id", Value: id}, {Key: "content-type", Value: "application/json"}}, Body: body}
}

func limits(concurrent, queue int, timeout time.Duration) extproc.Limits {
	return extproc.Limits{MaxConcurrent: concurrent, MaxQueue: queue, QueueTimeout: timeout}
}

// openAIError decodes an error body and fails unless it has the OpenAI shape.
func openAIError(t *testing.T, body []byte) (typ, code, param string) {
	t.Helper()
	var e struct {
		Error *struct {
			Message *string `json:"message"`
			Type    *string `json:"type"`
			Param   *string `json:"param"`
			Code    *string `json:"code"`
		} `json:"error"`
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&e); err != nil || e.Error == nil || e.Error.Message == nil || e.Error.Type == nil {
		t.Fatalf("body %q is not an OpenAI error", body)
	}
	// param and code must be present, even when null.
	var raw map[string]map[string]any
	_ = json.Unmarshal(body, &raw)
	for _, k := range []string{"message", "type", "param", "code"} {
		if _, ok := raw["error"][k]; !ok {
			t.Fatalf("error body %q lacks %q", body, k)
		}
	}
	if e.Error.Param != nil {
		param = *e.Error.Param
	}
	if e.Error.Code != nil {
		code = *e.Error.Code
	}
	return *e.Error.Type, code, param
}

func do(t *testing.T, h *harness, ctx context.Context, r extproctest.Request) *extproctest.Result {
	t.Helper()
	res, err := h.env.Do(ctx, r)
	if err != nil {
		t.Fatalf("Envoy: %v", err)
	}
	if res.Bypassed {
		t.Fatal("the server ended the stream with OK before answering: Envoy would have sent the request on unprocessed")
	}
	return res
}

func TestAdmit(t *testing.T) {
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Second)}})
	res := do(t, h, context.Background(), req("a", chat("llama")))
	if res.Status != 200 || res.Immediate {
		t.Fatalf("status %d immediate %v body %q, want 200 from upstream", res.Status, res.Immediate, res.Body)
	}
	f := res.Forwarded
	if f == nil || f.Cluster != "vgw/llama" {
		t.Fatalf("routed to %+v, want cluster vgw/llama", f)
	}
	for k, want := range map[string]string{"x-vgw-model": "llama", "x-vgw-cluster": "vgw/llama", "x-vgw-queue-depth": "0"} {
		if got := f.Get(k); got != want {
			t.Errorf("upstream header %s = %q, want %q", k, got, want)
		}
	}
	if got := res.Get("x-vgw-queue-depth"); got != "0" {
		t.Errorf("client sees x-vgw-queue-depth %q, want 0", got)
	}
	if !bytes.Equal(f.Body, chat("llama")) {
		t.Errorf("upstream body %q, want the client's body unchanged", f.Body)
	}
	if want := []string{"request_headers", "request_body", "response_headers"}; !slices.Equal(res.Sent, want) {
		t.Errorf("Envoy sent %v, want %v", res.Sent, want)
	}
	h.idle(t, "llama")
	o := <-h.leases.obsCh
	if o.model != "llama" || o.res.Status != 200 {
		t.Errorf("manager observed %+v, want llama 200", o)
	}
	if st := h.stats(t, "llama"); st.Completed != 1 {
		t.Errorf("completed %d, want 1", st.Completed)
	}
}

func TestRejections(t *testing.T) {
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Second)}}, extproc.Options{MaxBody: 4096})
	big := append(chat("llama")[:0:0], `{"model":"llama","prompt":"`...)
	big = append(big, strings.Repeat("x", 5000)...)
	big = append(big, `"}`...)
	huge := []byte(`{"model":"llama","prompt":"` + strings.Repeat("x", 9<<20) + `"}`)
	tests := []struct {
		name       string
		req        extproctest.Request
		status     int
		typ, code  string
		param      string
		immediate  bool
		envoyReply bool // answered by Envoy itself, not in OpenAI shape
	}{
		{name: "unknown model", req: req("1", chat("gpt-5")), status: 404, typ: "invalid_request_error", code: "model_not_found", param: "model", immediate: true},
		// vgw reads as far as the model key; JSON broken before it is 400,
		// what follows it is the backend's to judge.
		{name: "bad JSON", req: req("2", []byte(`{"messages":[{"role":"user",}],"model":"llama"}`)), status: 400, typ: "invalid_request_error", code: "invalid_json", immediate: true},
		{name: "not an object", req: req("3", []byte(`["llama"]`)), status: 400, typ: "invalid_request_error", code: "invalid_json", immediate: true},
		{name: "no model", req: req("4", []byte(`{"messages":[{"model":"llama"}]}`)), status: 400, typ: "invalid_request_error", code: "missing_model", immediate: true},
		{name: "model not a string", req: req("5", []byte(`{"model":7}`)), status: 400, typ: "invalid_request_error", code: "missing_model", immediate: true},
		{name: "no body", req: extproctest.Request{Method: "POST"}, status: 400, typ: "invalid_request_error", code: "missing_model", immediate: true},
		{name: "body over vgw's limit", req: req("6", big), status: 413, typ: "invalid_request_error", code: "request_too_large", immediate: true},
		// Over Envoy's own buffer limit, Envoy answers before vgw sees the
		// body; vgw's 413 on content-length comes first for honest clients.
		{name: "body over Envoy's buffer", req: extproctest.Request{Body: huge, Chunked: true}, status: 413, envoyReply: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := do(t, h, context.Background(), tt.req)
			if res.Status != tt.status || res.Immediate != tt.immediate {
				t.Fatalf("status %d immediate %v (%s) body %q, want %d", res.Status, res.Immediate, res.Details, res.Body, tt.status)
			}
			if res.Forwarded != nil {
				t.Fatal("a rejected request reached the upstream")
			}
			if tt.envoyReply {
				return
			}
			if res.Get("content-type") != "application/json" {
				t.Errorf("content-type %q, want application/json", res.Get("content-type"))
			}
			if res.Get("x-vgw-queue-depth") == "" {
				t.Error("no x-vgw-queue-depth on the answer")
			}
			typ, code, param := openAIError(t, res.Body)
			if typ != tt.typ || code != tt.code || param != tt.param {
				t.Errorf("error type %q code %q param %q, want %q %q %q", typ, code, param, tt.typ, tt.code, tt.param)
			}
		})
	}
	h.idle(t, "llama")
	if st := h.stats(t, "llama"); st.Completed != 0 {
		t.Errorf("rejections took slots: %d completed", st.Completed)
	}
}

// TestTrailers: a request that ends with HTTP/2 trailers reaches vgw as
// its whole body without end_of_stream (ext_proc.cc onTrailers), and is
// admitted like any other, whether or not Envoy sends the trailers on. One
// with trailers and no body reaches vgw only as its trailers, with
// request_trailer_mode SEND as shipped: vgw answers it as any request
// without a body. With SKIP it would go on unrouted, to Envoy's 503.
func TestTrailers(t *testing.T) {
	trailers := []extproctest.Header{{Key: "x-checksum", Value: "abc"}}
	for _, tc := range []struct {
		name   string
		mode   filterv3.ProcessingMode_HeaderSendMode
		req    extproctest.Request
		status int
		sent   []string
	}{
		{name: "body, SKIP", mode: filterv3.ProcessingMode_SKIP, req: extproctest.Request{Body: chat("llama"), Trailers: trailers},
			status: 200, sent: []string{"request_headers", "request_body", "response_headers"}},
		{name: "body, SEND", mode: filterv3.ProcessingMode_SEND, req: extproctest.Request{Body: chat("llama"), Trailers: trailers},
			status: 200, sent: []string{"request_headers", "request_body", "request_trailers", "response_headers"}},
		{name: "no body, SEND", mode: filterv3.ProcessingMode_SEND, req: extproctest.Request{Trailers: trailers},
			status: 400, sent: []string{"request_headers", "request_trailers"}},
		// The model list is answered at its headers, trailers or not.
		{name: "model list, SEND", mode: filterv3.ProcessingMode_SEND, req: extproctest.Request{Method: "GET", Path: "/v1/models", Trailers: trailers},
			status: 200, sent: []string{"request_headers"}},
		{name: "no body, SKIP", mode: filterv3.ProcessingMode_SKIP, req: extproctest.Request{Trailers: trailers},
			status: 503, sent: []string{"request_headers", "response_headers"}},
		// vgw never sees this request whole, so it drops the client's own
		// x-vgw-cluster at the headers: Envoy may not route by it.
		{name: "no body, SKIP, the client names a cluster", mode: filterv3.ProcessingMode_SKIP,
			req:    extproctest.Request{Trailers: trailers, Headers: []extproctest.Header{{Key: "x-vgw-cluster", Value: "vgw/llama"}}},
			status: 503, sent: []string{"request_headers", "response_headers"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Second)}})
			f := repoFilter(t)
			f.Clock = h.clock
			f.Mode.RequestTrailerMode = tc.mode
			env := extproctest.New(h.conn, f, h.up.serve)
			res, err := env.Do(context.Background(), tc.req)
			if err != nil {
				t.Fatal(err)
			}
			if res.Status != tc.status {
				t.Fatalf("status %d (%s) body %q, want %d", res.Status, res.Details, res.Body, tc.status)
			}
			if !slices.Equal(res.Sent, tc.sent) {
				t.Errorf("Envoy sent %v, want %v", res.Sent, tc.sent)
			}
			if tc.status != 200 && res.Forwarded != nil {
				t.Errorf("forwarded to %q", res.Forwarded.Cluster)
			}
			h.idle(t, "llama")
		})
	}
}

// TestQueueThenAdmit holds the only slot with a streamed response; a second
// request queues, survives Envoy's 200ms message timeout through
// override_message_timeout, and is sent on only after the first ends.
func TestQueueThenAdmit(t *testing.T) {
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(1, 4, 30*time.Second)}})
	a, doneA := h.streaming(t, context.Background(), "a", "llama")

	doneB := h.async(t, context.Background(), req("b", chat("llama")))
	poll.Until(t, "b is queued", func() bool { return h.stats(t, "llama").Queued == 1 })

	// b waits as long as a holds the slot, having asked Envoy for more
	// than its 200ms message timeout (checked in b's overrides below).
	a.chunks <- []byte("data: {\"choices\":[]}\n\n")
	select {
	case res := <-doneB:
		t.Fatalf("b finished while a held the slot: %d %s %q", res.Status, res.Details, res.Body)
	default:
	}
	if st := h.stats(t, "llama"); st.InFlight != 1 || st.Queued != 1 {
		t.Fatalf("in flight %d queued %d, want 1 and 1", st.InFlight, st.Queued)
	}
	close(a.chunks)
	resA := <-doneA
	if resA.Status != 200 || !strings.Contains(string(resA.Body), "data:") {
		t.Fatalf("a: %d %q", resA.Status, resA.Body)
	}
	resB := <-doneB
	if resB.Status != 200 || resB.Forwarded == nil {
		t.Fatalf("b: %d %s %q, want admitted", resB.Status, resB.Details, resB.Body)
	}
	if len(resB.Overrides) != 1 || resB.Overrides[0] <= 200*time.Millisecond {
		t.Errorf("b's message timeout overrides %v, want one longer than 200ms", resB.Overrides)
	}
	if len(resA.Overrides) != 0 {
		t.Errorf("a was never queued but asked for overrides %v", resA.Overrides)
	}
	h.idle(t, "llama")

	got := h.srv.Decisions().Recent(extproc.Filter{Model: "llama"})
	var outcomes []string
	for _, d := range slices.Backward(got) {
		outcomes = append(outcomes, d.Outcome.String()+"/"+d.Reason.String())
	}
	want := []string{"admitted/slot_free", "queued/wait_slot", "admitted/slot_granted"}
	if !slices.Equal(outcomes, want) {
		t.Errorf("decisions %v, want %v", outcomes, want)
	}
	if got[0].Wait <= 0 {
		t.Errorf("granted decision has no wait: %+v", got[0])
	}
}

func TestOverflow429(t *testing.T) {
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(1, 1, 20*time.Second)}})
	a, doneA := h.streaming(t, context.Background(), "a", "llama")
	doneB := h.async(t, context.Background(), req("b", chat("llama")))
	poll.Until(t, "b is queued", func() bool { return h.stats(t, "llama").Queued == 1 })

	res := do(t, h, context.Background(), req("c", chat("llama")))
	if res.Status != 429 || !res.Immediate {
		t.Fatalf("c: %d %q, want 429", res.Status, res.Body)
	}
	if typ, code, _ := openAIError(t, res.Body); typ != "rate_limit_exceeded" || code != "queue_full" {
		t.Errorf("429 type %q code %q", typ, code)
	}
	if got := res.Get("x-vgw-queue-depth"); got != "1" {
		t.Errorf("x-vgw-queue-depth %q, want 1", got)
	}
	// Nothing has completed yet and a has only just begun: c is told to
	// come back soon (about a second), in milliseconds for the OpenAI
	// SDKs and in whole seconds for the rest.
	ms, err := strconv.Atoi(res.Get("retry-after-ms"))
	if err != nil || ms < 100 || ms > 1100 || res.Get("retry-after") != strconv.Itoa((ms+999)/1000) {
		t.Errorf("retry-after-ms %q retry-after %q, want about a second", res.Get("retry-after-ms"), res.Get("retry-after"))
	}
	close(a.chunks)
	<-doneA
	if b := <-doneB; b.Status != 200 {
		t.Fatalf("b: %d", b.Status)
	}
	h.idle(t, "llama")
}

func TestQueueTimeout504(t *testing.T) {
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(1, 4, 300*time.Millisecond)}})
	a, doneA := h.streaming(t, context.Background(), "a", "llama")
	res := do(t, h, context.Background(), req("b", chat("llama")))
	if res.Status != 504 || !res.Immediate {
		t.Fatalf("b: %d (%s) %q, want vgw's own 504", res.Status, res.Details, res.Body)
	}
	if typ, code, _ := openAIError(t, res.Body); typ != "timeout" || code != "queue_timeout" {
		t.Errorf("504 type %q code %q", typ, code)
	}
	if st := h.stats(t, "llama"); st.Queued != 0 || st.InFlight != 1 {
		t.Errorf("after the timeout: queued %d in flight %d, want 0 and 1", st.Queued, st.InFlight)
	}
	close(a.chunks)
	<-doneA
	h.idle(t, "llama")
	d := h.srv.Decisions().Recent(extproc.Filter{Outcome: extproc.OutcomeTimedOut})
	if len(d) != 1 || d[0].Status != 504 || d[0].Wait < 300*time.Millisecond {
		t.Errorf("timed-out decisions %+v, want one 504 that waited >= 300ms", d)
	}
}

func TestDisconnectWhileQueued(t *testing.T) {
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(1, 4, 30*time.Second)}})
	a, doneA := h.streaming(t, context.Background(), "a", "llama")

	ctx, cancel := context.WithCancel(context.Background())
	doneB := h.async(t, ctx, req("b", chat("llama")))
	poll.Until(t, "b is queued", func() bool { return h.stats(t, "llama").Queued == 1 })
	cancel()
	if res := <-doneB; !res.ClientReset || res.Forwarded != nil {
		t.Fatalf("b: %+v, want a client reset that never reached the upstream", res)
	}
	poll.Until(t, "b left the queue", func() bool { return h.stats(t, "llama").Queued == 0 })
	if st := h.stats(t, "llama"); st.InFlight != 1 {
		t.Fatalf("in flight %d, want 1 (a only)", st.InFlight)
	}
	close(a.chunks)
	<-doneA
	h.idle(t, "llama")
	// The slot b never got is not lost: c goes straight in.
	if res := do(t, h, context.Background(), req("c", chat("llama"))); res.Status != 200 || len(res.Overrides) != 0 {
		t.Fatalf("c: %d overrides %v, want admitted at once", res.Status, res.Overrides)
	}
	// The decision is filed as b's handler returns, after b left the queue.
	poll.Until(t, "b's abandon is recorded", func() bool {
		return len(h.srv.Decisions().Recent(extproc.Filter{Outcome: extproc.OutcomeAbandoned})) == 1
	})
}

// TestStreamHoldsSlot checks that a streamed response keeps its slot until
// its last chunk, and that a client leaving mid-stream frees it.
func TestStreamHoldsSlot(t *testing.T) {
	for _, tc := range []struct {
		name       string
		disconnect bool
	}{{"to the end", false}, {"client leaves mid-stream", true}} {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, []extproc.Model{{Name: "llama", Limits: limits(2, 4, time.Second)}})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			s, done := h.streaming(t, ctx, "s", "llama")
			for i := range 3 {
				// An unbuffered send returns once Envoy has taken the chunk,
				// so the response headers have been processed.
				s.chunks <- []byte(fmt.Sprintf("data: %d\n\n", i))
				if st := h.stats(t, "llama"); st.InFlight != 1 {
					t.Fatalf("after chunk %d: in flight %d, want the slot held", i, st.InFlight)
				}
			}
			if tc.disconnect {
				cancel()
				if res := <-done; !res.ClientReset {
					t.Fatalf("want a client reset, got %+v", res)
				}
			} else {
				close(s.chunks)
				if res := <-done; res.Status != 200 || string(res.Body) != "data: 0\n\ndata: 1\n\ndata: 2\n\n" {
					t.Fatalf("got %d %q", res.Status, res.Body)
				}
			}
			h.idle(t, "llama")
			if o := <-h.leases.obsCh; o.res.Status != 200 {
				t.Errorf("observed %+v", o)
			}
		})
	}
}

// TestRemovedAndAddedBack: a model taken out of the config and put back
// while its requests are still in flight keeps counting them against its
// max_concurrent. It was given a fresh gate, so its backend ran twice its
// limit and its in-flight count (and metrics) forgot the first ones.
func TestRemovedAndAddedBack(t *testing.T) {
	llama := []extproc.Model{{Name: "llama", Limits: limits(2, 4, 10*time.Second)}}
	h := start(t, llama)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s1, done1 := h.streaming(t, ctx, "s1", "llama")
	s2, done2 := h.streaming(t, ctx, "s2", "llama")
	h.srv.SetModels(nil)
	if res := do(t, h, ctx, req("gone", chat("llama"))); res.Status != 404 {
		t.Fatalf("a removed model answered %d, want 404", res.Status)
	}
	h.srv.SetModels(withClusters(llama))
	third := h.async(t, ctx, req("third", chat("llama")))
	poll.Until(t, "the third request is queued", func() bool { return h.stats(t, "llama").Queued == 1 })
	if st := h.stats(t, "llama"); st.InFlight != 2 {
		t.Fatalf("in flight %d after the model came back, want the 2 still running", st.InFlight)
	}
	close(s1.chunks)
	<-done1
	if res := <-third; res.Status != 200 {
		t.Fatalf("the third request got %d once a slot freed", res.Status)
	}
	close(s2.chunks)
	<-done2
	h.idle(t, "llama")
}

// TestHeaderFastPath: where the operator trusts x-vgw-model, a request
// naming its model in it is decided on its headers, and Envoy is told not
// to send the body at all.
func TestHeaderFastPath(t *testing.T) {
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Second)}}, extproc.Options{TrustModelHeader: true})
	r := req("f", chat("llama"))
	r.Headers = append(r.Headers, extproctest.Header{Key: "x-vgw-model", Value: "llama"})
	res := do(t, h, context.Background(), r)
	if res.Status != 200 || res.Forwarded.Cluster != "vgw/llama" {
		t.Fatalf("got %d %+v", res.Status, res.Forwarded)
	}
	if want := []string{"request_headers", "response_headers"}; !slices.Equal(res.Sent, want) {
		t.Errorf("Envoy sent %v, want %v: the body should have been skipped", res.Sent, want)
	}
	if !bytes.Equal(res.Forwarded.Body, chat("llama")) {
		t.Error("the upstream did not get the body")
	}
	h.idle(t, "llama")
}

// TestModelLoad: a request for a model that is not resident waits for the
// load, within the load deadline, and is answered 503 when it fails.
func TestModelLoad(t *testing.T) {
	t.Run("loads", func(t *testing.T) {
		h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Second)}})
		load := h.leases.startLoading("llama")
		done := h.async(t, context.Background(), req("l", chat("llama")))
		poll.Until(t, "the request waits for the load", func() bool {
			return len(h.srv.Decisions().Recent(extproc.Filter{Outcome: extproc.OutcomeQueued})) == 1
		})
		select {
		case res := <-done:
			t.Fatalf("answered before the model loaded: %d %q", res.Status, res.Body)
		default:
		}
		close(load)
		res := <-done
		if res.Status != 200 || len(res.Overrides) != 1 {
			t.Fatalf("got %d overrides %v, want admitted after one override", res.Status, res.Overrides)
		}
		h.idle(t, "llama")
	})
	t.Run("fails", func(t *testing.T) {
		h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Second)}})
		load := h.leases.startLoading("llama")
		load <- errLoad
		res := do(t, h, context.Background(), req("l", chat("llama")))
		if res.Status != 503 || res.Get("retry-after") == "" {
			t.Fatalf("got %d retry-after %q, want 503 with Retry-After", res.Status, res.Get("retry-after"))
		}
		if _, code, _ := openAIError(t, res.Body); code != "model_unavailable" || !strings.Contains(string(res.Body), "12 GiB free") {
			t.Errorf("503 body %q should carry the manager's diagnostic", res.Body)
		}
		h.idle(t, "llama")
	})
	t.Run("fails, told without the log and with secrets masked", func(t *testing.T) {
		h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Second)}},
			extproc.Options{Redact: strings.NewReplacer("sk-planted", "[redacted]").Replace})
		load := h.leases.startLoading("llama")
		load <- &logTailError{public: "server exited (--api-key sk-planted)", tail: "CUDA out of memory"}
		res := do(t, h, context.Background(), req("l", chat("llama")))
		if res.Status != 503 || !strings.Contains(string(res.Body), `"message":"Model 'llama' is unavailable: server exited (--api-key [redacted])"`) {
			t.Errorf("got %d %q", res.Status, res.Body)
		}
		h.idle(t, "llama")
	})
	t.Run("times out", func(t *testing.T) {
		h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Second)}}, extproc.Options{LoadTimeout: 200 * time.Millisecond})
		h.leases.startLoading("llama")
		res := do(t, h, context.Background(), req("l", chat("llama")))
		if res.Status != 504 || !res.Immediate {
			t.Fatalf("got %d (%s), want vgw's 504", res.Status, res.Details)
		}
		if _, code, _ := openAIError(t, res.Body); code != "load_timeout" {
			t.Errorf("code %q, want load_timeout", code)
		}
		h.idle(t, "llama")
	})
}

func TestModelList(t *testing.T) {
	h := start(t, []extproc.Model{{Name: "qwen", Limits: limits(1, 1, time.Second)}, {Name: "llama", Limits: limits(1, 1, time.Second)}})
	res := do(t, h, context.Background(), extproctest.Request{Method: "GET", Path: "/v1/models"})
	var list struct {
		Object string `json:"object"`
		Data   []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := json.Unmarshal(res.Body, &list); err != nil || res.Status != 200 {
		t.Fatalf("got %d %q", res.Status, res.Body)
	}
	if list.Object != "list" || len(list.Data) != 2 || list.Data[0].ID != "llama" || list.Data[1].ID != "qwen" {
		t.Fatalf("list %+v", list)
	}
}

// TestConcurrentStreams runs 1,000 requests at once on one model with room
// for 50 in flight; every one is answered and no slot is left behind.
func TestConcurrentStreams(t *testing.T) {
	const n = 1000
	// The Envoy's clock stands still: slot accounting is under test, not
	// how fast two shared cores answer a thousand streams (make bench-load
	// and RELIABILITY.md's bursts measure that, in real time).
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(50, n, 30*time.Second)}})
	var wg sync.WaitGroup
	statuses := make([]int, n)
	for i := range n {
		wg.Go(func() {
			res, err := h.env.Do(context.Background(), req(strconv.Itoa(i), chat("llama")))
			if err != nil {
				t.Error(err)
				return
			}
			statuses[i] = res.Status
			if res.Status != 200 {
				t.Logf("request %d: %d %s %q", i, res.Status, res.Details, res.Body)
			}
		})
	}
	wg.Wait()
	for i, s := range statuses {
		if s != 200 {
			t.Fatalf("request %d: status %d", i, s)
		}
	}
	h.idle(t, "llama")
	poll.Until(t, "every request completed", func() bool { return h.stats(t, "llama").Completed == n })
}

// TestDecisionLogging: at debug level every decision is logged with its
// attributes; at info level an admitted request logs nothing.
func TestDecisionLogging(t *testing.T) {
	for _, level := range []slog.Level{slog.LevelDebug, slog.LevelInfo} {
		t.Run(level.String(), func(t *testing.T) {
			var buf syncBuffer
			log := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: level}))
			h := start(t, []extproc.Model{{Name: "llama", Limits: limits(1, 1, time.Second)}}, extproc.Options{Log: log})
			do(t, h, context.Background(), req("a", chat("llama")))
			do(t, h, context.Background(), req("b", chat("nope")))
			h.idle(t, "llama")
			out := buf.String()
			if level == slog.LevelInfo {
				if out != "" {
					t.Fatalf("info level logged %q", out)
				}
				return
			}
			var lines []map[string]any
			for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
				var m map[string]any
				if err := json.Unmarshal([]byte(l), &m); err != nil {
					t.Fatalf("log line %q: %v", l, err)
				}
				lines = append(lines, m)
			}
			if len(lines) != 2 {
				t.Fatalf("logged %d lines, want 2: %s", len(lines), out)
			}
			if lines[0]["msg"] != "decision" || lines[0]["model"] != "llama" || lines[0]["outcome"] != "admitted" || lines[0]["queue_depth"] != 0.0 {
				t.Errorf("admit line %v", lines[0])
			}
			if lines[1]["model"] != "nope" || lines[1]["status"] != 404.0 || lines[1]["reason"] != "unknown_model" {
				t.Errorf("reject line %v", lines[1])
			}
		})
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// logTailError is a load failure that, like the manager's, carries a log
// tail for operators and a shorter public cause.
type logTailError struct{ public, tail string }

func (e *logTailError) Error() string  { return e.public + "; last log lines: " + e.tail }
func (e *logTailError) Public() string { return e.public }

// TestEnvoyMessageTimer: what Envoy's ext_proc message timer does, on a
// clock the test moves. An Envoy that accepts no override (its
// max_message_timeout 0, while vgw believes it may extend) answers a
// request vgw is still holding with its own 504 once its timer runs out,
// and vgw gives the slot back; a vgw told the truth (0) answers the
// request itself, with a 504 of its own, before Envoy's timer could.
func TestEnvoyMessageTimer(t *testing.T) {
	noOverride := func(h *harness) {
		f := repoFilter(t)
		f.Clock = h.clock
		f.MaxMessageTimeout = 0
		h.env = extproctest.New(h.conn, f, h.up.serve)
	}
	t.Run("vgw waits past it: Envoy's 504", func(t *testing.T) {
		h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Second)}})
		noOverride(h)
		h.leases.startLoading("llama")
		done := h.async(t, context.Background(), req("l", chat("llama")))
		poll.Until(t, "the request waits for the load", func() bool {
			return len(h.srv.Decisions().Recent(extproc.Filter{Outcome: extproc.OutcomeQueued})) == 1
		})
		// Envoy's timer for the body message is running, vgw's override
		// ignored.
		if err := h.clock.BlockUntilContext(context.Background(), 1); err != nil {
			t.Fatal(err)
		}
		h.clock.Advance(repoFilter(t).MessageTimeout)
		res := <-done
		if res.Status != 504 || res.Details != extproctest.DetailMessageTimeout {
			t.Fatalf("got %d %s, want Envoy's own 504", res.Status, res.Details)
		}
		h.idle(t, "llama")
	})
	t.Run("vgw knows it cannot extend: vgw's 504", func(t *testing.T) {
		h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Second)}}, extproc.Options{MessageTimeout: 200 * time.Millisecond})
		noOverride(h)
		h.leases.startLoading("llama")
		res := do(t, h, context.Background(), req("l", chat("llama")))
		if res.Status != 504 || !res.Immediate || len(res.Overrides) != 0 {
			t.Fatalf("got %d %s overrides %v, want vgw's 504 and no override asked", res.Status, res.Details, res.Overrides)
		}
		if _, code, _ := openAIError(t, res.Body); code != "load_timeout" {
			t.Errorf("code %q, want load_timeout", code)
		}
		h.idle(t, "llama")
	})
}
