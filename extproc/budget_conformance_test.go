package extproc_test

import (
	"bytes"
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/vgw-project/vgw/extproc"
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
	// One request refills every 20s.
	if ra := res.Get("retry-after"); ra != "20" {
		t.Errorf("Retry-After %q, want 20", ra)
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
