package extproc

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
)

// TestMeterOverride: the response body of a tenant with a token budget is
// turned on at the response headers for a response that succeeded,
// restating the request's body mode as it stands (NONE for a request
// admitted at its headers, which vgw turned off then); a failed response
// is not metered, nor a tenant without a token budget.
func TestMeterOverride(t *testing.T) {
	lim := Limits{MaxConcurrent: 4, MaxQueue: 4, QueueTimeout: time.Second}
	s := New([]Model{{Name: "llama", Cluster: "c/llama", Limits: lim}}, readyLeases{}, Options{
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)), TrustModelHeader: true,
		Fairness: Fairness{Tenants: []Tenant{{Name: "a", TPM: 1000}, {Name: "b"}}},
	})
	hdr := func(k, v string) *corev3.HeaderValue { return &corev3.HeaderValue{Key: k, RawValue: []byte(v)} }
	tests := []struct {
		name, tenant, status string
		atHeaders            bool
		want                 *filterv3.ProcessingMode // nil: no override
	}{
		{"admitted at its body", "a", "200", false, &filterv3.ProcessingMode{RequestBodyMode: filterv3.ProcessingMode_BUFFERED, ResponseBodyMode: filterv3.ProcessingMode_STREAMED}},
		{"admitted at its headers", "a", "200", true, &filterv3.ProcessingMode{RequestBodyMode: filterv3.ProcessingMode_NONE, ResponseBodyMode: filterv3.ProcessingMode_STREAMED}},
		{"a failed response", "a", "503", false, nil},
		{"a tenant without a token budget", "b", "200", false, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cs := &captureStream{ctx: context.Background()}
			st := newStream(s, cs)
			headers := []*corev3.HeaderValue{hdr(":method", "POST"), hdr(":path", "/v1/chat/completions"), hdr("content-type", "application/json"), hdr(DefaultTenantHeader, tt.tenant)}
			if tt.atHeaders {
				headers = append(headers, hdr(HeaderModel, "llama"))
			}
			msgs := []*extprocv3.ProcessingRequest{{
				Request:        &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: headers}}},
				ProtocolConfig: &extprocv3.ProtocolConfiguration{RequestBodyMode: filterv3.ProcessingMode_BUFFERED},
			}}
			if !tt.atHeaders {
				msgs = append(msgs, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{
					Body: []byte(`{"model":"llama","stream":true}`), EndOfStream: true}}})
			}
			msgs = append(msgs, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{
				Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{hdr(":status", tt.status)}}}}})
			for _, m := range msgs {
				if _, err := st.handle(m); err != nil {
					t.Fatal(err)
				}
			}
			st.close()
			got := cs.sent[len(cs.sent)-1].GetModeOverride()
			if (got == nil) != (tt.want == nil) || got != nil && (got.GetRequestBodyMode() != tt.want.GetRequestBodyMode() || got.GetResponseBodyMode() != tt.want.GetResponseBodyMode()) {
				t.Errorf("mode override %v, want %v", got, tt.want)
			}
		})
	}
}

// TestTenantFullLeavesTurns: a tenant turned away at its cap is told to
// come back about when the first of its own is served, and moves no one
// else's turn: a flood at the cap does not push another tenant's
// Retry-After out.
func TestTenantFullLeavesTurns(t *testing.T) {
	g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 3}, fairTable(false)) // b's cap is 2
	g.served = time.Second                                                // a turn: 1s
	fill(t, g, "b//1", "b//2")
	now := time.Now()
	for range 200 { // b's flood, each answered as decideIn answers it
		if res, _ := g.enqueue(newWaiter(), now, fkey(g.table, "b", ""), 1); res != tenantFull {
			t.Fatal(res)
		}
		// b's first is next: in half a turn, spread by 10%.
		if d := g.tenantRetryAfter(now, fkey(g.table, "b", "")); d > 550*time.Millisecond {
			t.Fatalf("b told %v, want about half a second", d)
		}
	}
	// With c waiting too: while b holds the turn, b's first is still
	// next; once the turn is c's, b's comes a turn later.
	fill(t, g, "c//1")
	if d := g.tenantRetryAfter(now, fkey(g.table, "b", "")); d > 550*time.Millisecond {
		t.Fatalf("b told %v with the turn its own, want about half a second", d)
	}
	g.turnLocked(&g.bands[1], g.bands[1].flows[3])
	if d := g.tenantRetryAfter(now, fkey(g.table, "b", "")); d < 1350*time.Millisecond || d > 1650*time.Millisecond {
		t.Fatalf("b told %v with the turn c's, want about a second and a half", d)
	}
	// The queue is full: c, turned away, is told its own turn, as if b's
	// flood had not been.
	if res, _ := g.enqueue(newWaiter(), now, fkey(g.table, "c", ""), 1); res != full {
		t.Fatal(res)
	}
	if d := g.retryAfter(now); d > 550*time.Millisecond {
		t.Errorf("c told %v, want its own turn (half a second)", d)
	}
}
