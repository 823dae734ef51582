package extproc_test

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/internal/poll"
)

// TestRequestBudget: a tenant of 3 requests a minute has them at once;
// its fourth is answered 429 with the time until its budget has one
// again, and other tenants go on.
func TestRequestBudget(t *testing.T) {
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Minute)}},
		extproc.Options{Fairness: extproc.Fairness{Tenants: []extproc.Tenant{{Name: "a", RPM: 3}}}})
	ctx := context.Background()
	for i := range 3 {
		if res := do(t, h, ctx, fairReq(strconv.Itoa(i), "a", "")); res.Status != 200 {
			t.Fatalf("request %d: %d %s", i, res.Status, res.Details)
		}
	}
	res := do(t, h, ctx, fairReq("3", "a", ""))
	if res.Status != 429 || res.Details != "vgw_over_budget" {
		t.Fatalf("fourth: %d %s, want 429 over_budget", res.Status, res.Details)
	}
	if typ, code, _ := openAIError(t, res.Body); typ != "rate_limit_exceeded" || code != "rpm_exceeded" {
		t.Errorf("type %q code %q", typ, code)
	}
	// One request refills every 20s, from the first one's time.
	if ra, _ := strconv.Atoi(res.Get("retry-after")); ra < 19 || ra > 20 {
		t.Errorf("Retry-After %q, want 20 (less the time the requests took)", res.Get("retry-after"))
	}
	if res := do(t, h, ctx, fairReq("b", "b", "")); res.Status != 200 {
		t.Errorf("another tenant: %d %s", res.Status, res.Details)
	}
	if f := flowStat(h, t, 0, "a"); f.Admitted != 3 || f.Rejected != 1 {
		t.Errorf("a's counts %+v, want 3 admitted, 1 rejected", f)
	}
}

// TestTokenBudget: a tenant of 1,000 tokens a minute is charged what each
// response's usage says, a stream's included: vgw asks its model to
// report usage at the stream's end, and reads it from the response as it
// passes. Once in debt the tenant is answered 429 until the debt has
// refilled; a tenant without a token budget is not metered.
func TestTokenBudget(t *testing.T) {
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Minute)}},
		extproc.Options{Fairness: extproc.Fairness{Tenants: []extproc.Tenant{{Name: "a", TPM: 1000}, {Name: "b"}}}})
	ctx := context.Background()
	stream := func(id, tenant string) (forwarded []byte, status int) {
		t.Helper()
		hold := h.up.hold(id)
		done := h.async(t, ctx, fairReq(id, tenant, ""))
		up := <-hold
		// The usage comes in the stream's last event, cut across chunks.
		up.chunks <- []byte("data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"total_tok")
		up.chunks <- []byte("ens\":600,\"completion_tokens\":590}}\n\ndata: [DONE]\n\n")
		close(up.chunks)
		res := <-done
		return up.fwd.Body, res.Status
	}
	body, status := stream("a1", "a")
	if status != 200 || !bytes.Contains(body, []byte(`"stream_options":{"include_usage":true}`)) {
		t.Fatalf("a1: %d, forwarded %s: want the stream asked to include usage", status, body)
	}
	// 600 of 1,000: the budget is not spent.
	if _, status := stream("a2", "a"); status != 200 {
		t.Fatalf("a2: %d", status)
	}
	// 1,200 of 1,000: 200 in debt, 12s to refill.
	res := do(t, h, ctx, fairReq("a3", "a", ""))
	if res.Status != 429 || res.Details != "vgw_over_budget" {
		t.Fatalf("a3: %d %s, want 429 over_budget", res.Status, res.Details)
	}
	if _, code, _ := openAIError(t, res.Body); code != "tpm_exceeded" {
		t.Errorf("code %q", code)
	}
	if ra, _ := strconv.Atoi(res.Get("retry-after")); ra < 11 || ra > 12 {
		t.Errorf("Retry-After %q, want 12 (200 tokens at 1,000 a minute)", res.Get("retry-after"))
	}
	// b has no token budget: its request goes on as it came.
	if body, status := stream("b1", "b"); status != 200 || bytes.Contains(body, []byte("stream_options")) {
		t.Errorf("b1: %d, forwarded %s", status, body)
	}
}

// BenchmarkMeteredResponse times a streamed answer of 100 events through
// vgw over real gRPC, as Envoy drives it: for a tenant with a token
// budget, whose response body comes to vgw chunk by chunk (each held by
// Envoy until vgw answers), against one without (the body goes by).
func BenchmarkMeteredResponse(b *testing.B) {
	event := []byte(`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"llama","choices":[{"index":0,"delta":{"content":" the"}}]}` + "\n\n")
	for _, tenant := range []string{"plain", "metered"} {
		b.Run(tenant, func(b *testing.B) {
			h := start(b, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Minute)}},
				extproc.Options{Fairness: extproc.Fairness{Tenants: []extproc.Tenant{{Name: "metered", TPM: 1 << 30}, {Name: "plain"}}}})
			ctx := context.Background()
			n := 0
			for b.Loop() {
				n++
				id := strconv.Itoa(n)
				hold := h.up.hold(id)
				done := make(chan int, 1)
				go func() {
					res, err := h.env.Do(ctx, fairReq(id, tenant, ""))
					if err != nil {
						b.Error(err)
						done <- 0
						return
					}
					done <- res.Status
				}()
				up := <-hold
				for range 100 {
					up.chunks <- event
				}
				close(up.chunks)
				if st := <-done; st != 200 {
					b.Fatalf("status %d", st)
				}
			}
		})
	}
}

// TestTokenBudgetEdges: what is charged, and what a request forwarded,
// where the usage does not come as for a plain chat stream: an audio
// upload (its answer has no total_tokens, and its body is a file, not a
// prompt: it is not charged by its size); a model whose request defaults
// set stream_options (left as they are, never a second key) or stream.
func TestTokenBudgetEdges(t *testing.T) {
	t.Run("an audio upload", func(t *testing.T) {
		h := start(t, []extproc.Model{{Name: "whisper", Limits: limits(4, 4, time.Second)}},
			extproc.Options{Fairness: extproc.Fairness{Tenants: []extproc.Tenant{{Name: "a", TPM: 100000}}}})
		body, ct := form(t, "", [2]string{"model", "whisper"}, [2]string{"file", strings.Repeat("a", 2<<20)})
		r := extproctest.Request{Path: "/v1/audio/transcriptions", Headers: []extproctest.Header{{Key: "content-type", Value: ct}, {Key: extproc.DefaultTenantHeader, Value: "a"}}, Body: body}
		if res := do(t, h, context.Background(), r); res.Status != 200 {
			t.Fatalf("upload: %d %s", res.Status, res.Details)
		}
		h.idle(t, "whisper")
		// The same upload routed by its headers (a trusted x-vgw-model).
		h.srv.SetTrustModelHeader(true)
		hr := r
		hr.Headers = append(slices.Clone(r.Headers), extproctest.Header{Key: extproc.HeaderModel, Value: "whisper"})
		if res := do(t, h, context.Background(), hr); res.Status != 200 {
			t.Fatalf("upload at its headers: %d %s", res.Status, res.Details)
		}
		h.idle(t, "whisper")
		r.Body, r.Headers[0].Value = []byte(`{"model":"whisper"}`), "application/json"
		r.Path = "/v1/chat/completions"
		if res := do(t, h, context.Background(), r); res.Status != 200 {
			t.Fatalf("the tenant's next request after a 2 MiB upload: %d %s, Retry-After %s", res.Status, res.Details, res.Get("retry-after"))
		}
	})
	for _, tc := range []struct {
		name, defaults, want string
	}{
		{"defaults with stream_options", `{"stream_options":{"continuous_usage_stats":false}}`, `"stream_options":{"continuous_usage_stats":false}`},
		{"defaults that stream", `{"stream":true}`, `"stream_options":{"include_usage":true}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Second), Defaults: []byte(tc.defaults)}},
				extproc.Options{Fairness: extproc.Fairness{Tenants: []extproc.Tenant{{Name: "a", TPM: 100000}}}})
			r := fairReq("1", "a", "")
			r.Body = []byte(`{"model":"llama","messages":[]}`)
			res := do(t, h, context.Background(), r)
			if res.Status != 200 {
				t.Fatal(res.Status)
			}
			if fwd := string(res.Forwarded.Body); strings.Count(fwd, `"stream_options"`) != 1 || !strings.Contains(fwd, tc.want) {
				t.Errorf("forwarded %s, want one stream_options, %s", fwd, tc.want)
			}
		})
	}
}

// TestRequestBudgetGivenBack: a request that never reaches its model (it
// times out waiting, the queue is full, or it is displaced) is given back
// to its tenant's request budget, so a tenant refused by a busy model is
// not also refused by its budget once the model is free.
func TestRequestBudgetGivenBack(t *testing.T) {
	ctx := context.Background()
	// spent checks that a (2 requests a minute) has both left once the
	// model is free, and no more.
	spent := func(t *testing.T, h *harness) {
		t.Helper()
		h.idle(t, "llama")
		for i := range 2 {
			if res := do(t, h, ctx, fairReq(fmt.Sprint("ok", i), "a", "")); res.Status != 200 {
				t.Fatalf("a's request %d once the model is free: %d %s", i, res.Status, res.Details)
			}
		}
		if res := do(t, h, ctx, fairReq("over", "a", "")); res.Status != 429 || res.Details != "vgw_over_budget" {
			t.Fatalf("a's third served request in the minute: %d %s, want over budget", res.Status, res.Details)
		}
	}
	t.Run("timed out", func(t *testing.T) {
		h := start(t, []extproc.Model{{Name: "llama", Limits: limits(1, 1, 50*time.Millisecond)}},
			extproc.Options{Fairness: extproc.Fairness{Tenants: []extproc.Tenant{{Name: "a", RPM: 2}}}})
		busy, doneBusy := h.streaming(t, ctx, "busy", "llama")
		for i := range 3 {
			if res := do(t, h, ctx, fairReq(fmt.Sprint("a", i), "a", "")); res.Status != 504 {
				t.Fatalf("a%d while the model is busy: %d %s, want 504", i, res.Status, res.Details)
			}
		}
		close(busy.chunks)
		<-doneBusy
		spent(t, h)
	})
	t.Run("turned away and displaced", func(t *testing.T) {
		h := startEdited(t, []extproc.Model{{Name: "llama", Limits: limits(1, 1, time.Minute)}}, keepObjective,
			extproc.Options{Fairness: extproc.Fairness{Objectives: map[string]int{"hi": 10}, Tenants: []extproc.Tenant{{Name: "a", RPM: 2}}}})
		busy, doneBusy := h.streaming(t, ctx, "busy", "llama")
		doneA := h.async(t, ctx, fairReq("a0", "a", ""))
		poll.Until(t, "a0 is queued", func() bool { return h.stats(t, "llama").Queued == 1 })
		doneHi := h.async(t, ctx, fairReq("hi", "", "hi"))
		if res := <-doneA; res.Status != 429 || res.Details != "vgw_displaced" {
			t.Fatalf("a0: %d %s, want displaced", res.Status, res.Details)
		}
		for i := range 3 {
			if res := do(t, h, ctx, fairReq(fmt.Sprint("a", i+1), "a", "")); res.Status != 429 || res.Details != "vgw_queue_full" {
				t.Fatalf("a%d: %d %s, want queue_full", i+1, res.Status, res.Details)
			}
		}
		close(busy.chunks)
		<-doneBusy
		if res := <-doneHi; res.Status != 200 {
			t.Fatalf("hi: %d %s", res.Status, res.Details)
		}
		spent(t, h)
	})
}

// TestMeteredReset: a client that leaves in the middle of a metered
// stream ends its request once: one release, the slot back, and the
// tenant charged what it was sent (an estimate: no usage came).
func TestMeteredReset(t *testing.T) {
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(1, 4, time.Minute)}},
		extproc.Options{Fairness: extproc.Fairness{Tenants: []extproc.Tenant{{Name: "a", TPM: 40}}}})
	ctx, cancel := context.WithCancel(context.Background())
	hold := h.up.hold("r")
	done := h.async(t, ctx, fairReq("r", "a", ""))
	up := <-hold
	up.chunks <- []byte("data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n")
	cancel()
	if res := <-done; !res.ClientReset {
		t.Fatalf("%d %s, want the client gone", res.Status, res.Details)
	}
	h.idle(t, "llama")
	select {
	case o := <-h.leases.obsCh:
		if o.model != "llama" {
			t.Fatalf("released %q", o.model)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the lease was never released")
	}
	select {
	case o := <-h.leases.obsCh:
		t.Fatalf("released twice: %+v", o)
	default:
	}
	// The reset was charged one event and its prompt (87 bytes: 21
	// tokens), 22 of a's 40; the next request (no usage, no events) 21
	// more: only with the reset's counted is a in debt after it.
	if res := do(t, h, context.Background(), fairReq("next", "a", "")); res.Status != 200 {
		t.Fatalf("a's next: %d %s", res.Status, res.Details)
	}
	if res := do(t, h, context.Background(), fairReq("then", "a", "")); res.Status != 429 || res.Details != "vgw_over_budget" {
		t.Fatalf("a's third: %d %s, want over budget (the reset's tokens counted)", res.Status, res.Details)
	}
}
