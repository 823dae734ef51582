package extproc_test

import (
	"context"
	"testing"
	"time"

	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/internal/poll"
)

// TestResetAtEveryPhase: Envoy resets the ext_proc stream (the client went
// away) after each message it can send, in each state vgw can be in when
// it does: deciding, admitted, queued for a slot, waiting for the model to
// load, waiting for the upstream, and mid-response. Whatever the moment,
// the slot or queue place is given back exactly once: the model ends idle
// (a double release would leave it below zero), its one slot admits the
// next request, and the manager hears of no request that never ran.
func TestResetAtEveryPhase(t *testing.T) {
	headerReq := func(id string) extproctest.Request {
		r := req(id, chat("llama"))
		r.Headers = append(r.Headers, extproctest.Header{Key: "x-vgw-model", Value: "llama"})
		return r
	}
	// waitedAndOverridden holds once the request waits for its slot (or
	// its load, when slot is false) and Envoy has taken vgw's
	// override_message_timeout: the stream is in vgw's own wait, past
	// where Envoy's 200 ms timer would have ended it.
	waitedAndOverridden := func(slot bool) func(t *testing.T, h *harness) bool {
		return func(t *testing.T, h *harness) bool {
			waiting := h.stats(t, "llama").Queued == 1
			if !slot {
				waiting = len(h.srv.Decisions().Recent(extproc.Filter{Outcome: extproc.OutcomeQueued})) > 0
			}
			return waiting && h.env.Overrides() == 1
		}
	}
	inFlight := func(t *testing.T, h *harness) bool { return h.stats(t, "llama").InFlight == 1 }
	once, maybe := [2]int{1, 1}, [2]int{0, 1}
	tests := []struct {
		name  string
		setup func(t *testing.T, h *harness) (cleanup func()) // puts vgw in the state
		req   extproctest.Request
		// resetWhen, if set, resets the stream (the client leaves) once it
		// holds; else the request's ResetAfter does.
		resetWhen func(t *testing.T, h *harness) bool
		// setupRuns: requests the setup itself runs to the end; ran: how
		// many times the manager may hear of this request ending, at least
		// and at most (a reset racing vgw's answer may find it admitted).
		setupRuns int
		ran       [2]int
		// waited: the request waited (for the slot, or the load) and vgw
		// asked Envoy for the time, before the client left.
		waited bool
	}{
		{name: "after request headers, model in the body", req: resetAfter(req("a", chat("llama")), "request_headers")},
		{name: "after request headers, admitted at headers", req: resetAfter(headerReq("b"), "request_headers"), ran: maybe},
		{name: "after request body, admitted", req: resetAfter(req("c", chat("llama")), "request_body"), ran: maybe},
		{name: "after request body, queued for the slot", setup: holdSlot, setupRuns: 1, req: resetAfter(req("d", chat("llama")), "request_body"), ran: maybe},
		{name: "queued, its wait overridden", setup: holdSlot, setupRuns: 1, req: req("e", chat("llama")), resetWhen: waitedAndOverridden(true), waited: true},
		// The reset can reach vgw before it has read the body, and the load
		// can end (the setup's cleanup) before it does: then it admits the
		// request and hears it end.
		{name: "after request body, model loading", setup: loading, req: resetAfter(req("f", chat("llama")), "request_body"), ran: maybe},
		{name: "while the model loads", setup: loading, req: req("g", chat("llama")), resetWhen: waitedAndOverridden(false), waited: true},
		{name: "waiting for the upstream's headers", setup: stall("h"), req: req("h", chat("llama")), resetWhen: inFlight, ran: once},
		{name: "after response headers", req: resetAfter(req("i", chat("llama")), "response_headers"), ran: once},
		{name: "mid-response", setup: hold("j"), req: req("j", chat("llama")), resetWhen: inFlight, ran: once},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := start(t, []extproc.Model{{Name: "llama", Limits: limits(1, 4, 30*time.Second)}}, extproc.Options{TrustModelHeader: true})
			cleanup := func() {}
			if tt.setup != nil {
				cleanup = tt.setup(t, h)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := h.async(t, ctx, tt.req)
			if tt.resetWhen != nil {
				poll.Until(t, "the request is in place", func() bool { return tt.resetWhen(t, h) })
				cancel()
			}
			res := <-done
			if !res.ClientReset {
				t.Fatalf("got %d %s, want the client gone", res.Status, res.Details)
			}
			if tt.waited && (len(res.Overrides) != 1 || res.Overrides[0] <= repoFilter(t).MessageTimeout) {
				t.Errorf("overrides %v, want one asking for more than the message timeout", res.Overrides)
			}
			// vgw has seen the reset once the request holds nothing: only
			// the setup's own request may hold the slot.
			poll.Until(t, "the reset request holds nothing", func() bool {
				st := h.stats(t, "llama")
				return st.Queued == 0 && st.InFlight == tt.setupRuns
			})
			cleanup()
			h.idle(t, "llama")
			observed := func() int {
				h.leases.mu.Lock()
				defer h.leases.mu.Unlock()
				return len(h.leases.observed) - tt.setupRuns
			}
			// The manager hears after the slot is back: wait for the least.
			poll.Until(t, "the manager hears", func() bool { return observed() >= tt.ran[0] })
			n := observed()
			if n < tt.ran[0] || n > tt.ran[1] {
				t.Errorf("the manager heard of the request ending %d times, want %d to %d", n, tt.ran[0], tt.ran[1])
			}
			// The one slot is free: the next request goes straight through.
			if res := do(t, h, context.Background(), req("next", chat("llama"))); res.Status != 200 || res.Forwarded == nil {
				t.Fatalf("next request: %d %s", res.Status, res.Details)
			}
			h.idle(t, "llama")
		})
	}
}

func resetAfter(r extproctest.Request, phase string) extproctest.Request {
	r.ResetAfter = phase
	return r
}

// holdSlot takes the model's only slot with a streamed response, until
// cleanup ends it.
func holdSlot(t *testing.T, h *harness) func() {
	s, done := h.streaming(t, context.Background(), "holder", "llama")
	return func() {
		close(s.chunks)
		if res := <-done; res.Status != 200 {
			t.Errorf("the holder: %d", res.Status)
		}
	}
}

// loading makes the model not resident, its load never ending on its own;
// cleanup fails it, so that a vgw yet to see the reset does not admit.
func loading(t *testing.T, h *harness) func() {
	load := h.leases.startLoading("llama")
	return func() {
		load <- errLoad
		h.leases.mu.Lock()
		delete(h.leases.loading, "llama")
		h.leases.mu.Unlock()
	}
}

// stall makes the upstream never answer request id.
func stall(id string) func(*testing.T, *harness) func() {
	return func(t *testing.T, h *harness) func() {
		h.up.stall(id)
		return func() {}
	}
}

// hold makes the upstream stream its answer to request id, never ending it.
func hold(id string) func(*testing.T, *harness) func() {
	return func(t *testing.T, h *harness) func() {
		ch := h.up.hold(id)
		go func() {
			s := <-ch
			s.chunks <- []byte("data: 1\n\n")
		}()
		return func() {}
	}
}
