package extproc_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/internal/poll"
)

// fairReq is request id for llama from tenant, at objective when set.
func fairReq(id, tenant, objective string) extproctest.Request {
	r := req(id, chat("llama"))
	if tenant != "" {
		r.Headers = append(r.Headers, extproctest.Header{Key: extproc.DefaultTenantHeader, Value: tenant})
	}
	if objective != "" {
		r.Headers = append(r.Headers, extproctest.Header{Key: extproc.DefaultObjectiveHeader, Value: objective})
	}
	return r
}

// keepObjective edits the Envoy as an operator who lets clients choose
// their priority: the objective header is no longer dropped.
func keepObjective(f *extproctest.Filter) {
	strip := f.StripHeader
	f.StripHeader = func(k string) bool { return k != extproc.DefaultObjectiveHeader && strip != nil && strip(k) }
}

// flowStat is a tenant's flow at a priority in the model's stats.
func flowStat(h *harness, t *testing.T, priority int, tenant string) extproc.FlowStats {
	for _, b := range h.stats(t, "llama").Bands {
		if b.Priority == priority {
			for _, f := range b.Tenants {
				if f.Tenant == tenant {
					return f
				}
			}
		}
	}
	return extproc.FlowStats{}
}

// served plays the model: each request that reaches it is held until the
// test ends it. next ends the oldest request held and returns the id of
// the request admitted into its slot, if one is.
type served struct {
	t     *testing.T
	h     *harness
	holds map[string]chan *held
	live  []*held
}

func newServed(t *testing.T, h *harness, ids ...string) *served {
	s := &served{t: t, h: h, holds: map[string]chan *held{}}
	for _, id := range ids {
		s.holds[id] = h.up.hold(id)
	}
	return s
}

// arrived takes the next request to reach the model.
func (s *served) arrived() string {
	s.t.Helper()
	select {
	case f := <-s.h.up.arrived:
		id := f.Get("x-request-id")
		s.live = append(s.live, <-s.holds[id])
		return id
	case <-time.After(10 * time.Second):
		s.t.Fatal("no request reached the model")
		return ""
	}
}

// endOldest ends the oldest request held, so its slot goes to the next.
func (s *served) endOldest() {
	close(s.live[0].chunks)
	s.live = s.live[1:]
}

// queuedReq is a request that waits: its id, tenant and objective.
type queuedReq struct{ id, tenant, objective string }

// queueBehind holds the model's only slot with a request, x, then queues
// the waiters in order, each once the one before is queued. It returns
// the model's side, holding x, and where every answer arrives.
func queueBehind(t *testing.T, h *harness, waiters []queuedReq) (*served, <-chan *extproctest.Result) {
	ids := []string{"x"}
	for _, w := range waiters {
		ids = append(ids, w.id)
	}
	s := newServed(t, h, ids...)
	ctx := context.Background()
	done := make(chan *extproctest.Result, len(ids))
	go func() { done <- do(t, h, ctx, fairReq("x", "", "")) }()
	s.arrived()
	for i, w := range waiters {
		go func() { done <- do(t, h, ctx, fairReq(w.id, w.tenant, w.objective)) }()
		poll.Until(t, w.id+" is queued", func() bool { return h.stats(t, "llama").Queued == i+1 })
	}
	return s, done
}

// serveEach frees the slot n times, one request at a time, and returns
// the ids of the requests it went to.
func (s *served) serveEach(n int) []string {
	var order []string
	for range n {
		s.endOldest()
		order = append(order, s.arrived())
	}
	return order
}

// endAll ends every request held and checks that all n answered 200.
func (s *served) endAll(done <-chan *extproctest.Result, n int) {
	for len(s.live) > 0 {
		s.endOldest()
	}
	for range n {
		if res := <-done; res.Status != 200 {
			s.t.Errorf("%d %s", res.Status, res.Details)
		}
	}
}

// TestFairFlood: tenant a floods the model with thousands of requests,
// filling its slots and its queue and being turned away for the rest;
// tenant b then sends a few. Each of b's displaces a's newest waiter,
// which is answered 429 with Retry-After, and b's are admitted within the
// first slots that free up, not behind a's backlog.
func TestFairFlood(t *testing.T) {
	const flood, queue, slots = 2000, 100, 2
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(slots, queue, time.Minute)}},
		extproc.Options{Fairness: extproc.Fairness{Tenants: []extproc.Tenant{{Name: "a", MaxQueue: -1}, {Name: "b", MaxQueue: -1}}}})
	var ids []string
	for i := range flood {
		ids = append(ids, fmt.Sprint("a", i))
	}
	bs := []string{"b0", "b1", "b2"}
	s := newServed(t, h, append(ids, bs...)...)
	ctx := context.Background()
	doneA := make(chan *extproctest.Result, flood)
	// a's first take the slots; then the flood.
	for _, id := range ids[:slots] {
		go func() { doneA <- do(t, h, ctx, fairReq(id, "a", "")) }()
		s.arrived()
	}
	for _, id := range ids[slots:] {
		go func() { doneA <- do(t, h, ctx, fairReq(id, "a", "")) }()
	}
	for range flood - slots - queue {
		if res := <-doneA; res.Status != 429 || res.Details != "vgw_queue_full" {
			t.Fatalf("a's flood: %d %s, want 429 queue_full", res.Status, res.Details)
		}
	}
	if st := h.stats(t, "llama"); st.Queued != queue {
		t.Fatalf("queued %d, want %d", st.Queued, queue)
	}
	doneB := make(chan *extproctest.Result, len(bs))
	for i, id := range bs {
		go func() { doneB <- do(t, h, ctx, fairReq(id, "b", "")) }()
		res := <-doneA
		if res.Status != 429 || res.Details != "vgw_displaced" || res.Get("retry-after") == "" {
			t.Fatalf("a's newest, when %s came: %d %s retry-after %q, want 429 displaced with Retry-After", id, res.Status, res.Details, res.Get("retry-after"))
		}
		if typ, code, _ := openAIError(t, res.Body); typ != "rate_limit_exceeded" || code != "queue_full" {
			t.Errorf("displaced: type %q code %q", typ, code)
		}
		poll.Until(t, id+" is queued", func() bool { return flowStat(h, t, 0, "b").Queued == i+1 })
	}
	// Slots free one at a time: b's come in the first few.
	order := s.serveEach(2 * len(bs))
	if got := strings.Count(strings.Join(order, " "), "b"); got != len(bs) {
		t.Errorf("the first %d slots went to %v: %d of b's %d requests, want all", len(order), order, got, len(bs))
	}
	// The rest of a's backlog is served.
	s.serveEach(queue - len(order))
	for len(s.live) > 0 {
		s.endOldest()
	}
	h.idle(t, "llama")
	if a, b := flowStat(h, t, 0, "a"), flowStat(h, t, 0, "b"); a.Admitted != slots+queue-uint64(len(bs)) || a.Displaced != 3 ||
		a.Rejected != flood-slots-queue || b.Admitted != 3 {
		t.Errorf("counts a %+v b %+v", a, b)
	}
}

// TestFairPriorities: a higher priority is always served first, the same
// priority in the order it came; the decision ring records each
// request's tenant and priority.
func TestFairPriorities(t *testing.T) {
	h := startEdited(t, []extproc.Model{{Name: "llama", Limits: limits(1, 10, time.Minute)}}, keepObjective,
		extproc.Options{Fairness: extproc.Fairness{Objectives: map[string]int{"interactive": 10, "batch": -10}}})
	s, done := queueBehind(t, h, []queuedReq{
		{"b1", "", "batch"}, {"b2", "", "batch"}, {"d1", "", ""}, {"i1", "", "interactive"}, {"b3", "", "batch"}, {"i2", "", "interactive"}, {"u1", "", "unknown"},
	})
	if got, want := strings.Join(s.serveEach(7), " "), "i1 i2 d1 u1 b1 b2 b3"; got != want {
		t.Errorf("served %s, want %s", got, want)
	}
	s.endAll(done, 8)
	got := map[int]int{}
	for _, d := range h.srv.Decisions().Recent(extproc.Filter{Model: "llama", Outcome: extproc.OutcomeQueued}) {
		if d.Tenant != extproc.DefaultTenant {
			t.Errorf("decision tenant %q, want %q", d.Tenant, extproc.DefaultTenant)
		}
		got[d.Priority]++
	}
	if got[10] != 2 || got[0] != 2 || got[-10] != 3 {
		t.Errorf("queued decisions by priority %v, want 10:2 0:2 -10:3", got)
	}
}

// TestClientCannotRaisePriority: with envoy.yaml as shipped, Envoy drops
// a client's objective header before vgw sees it; the tenant header goes
// through.
func TestClientCannotRaisePriority(t *testing.T) {
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(1, 10, time.Minute)}},
		extproc.Options{Fairness: extproc.Fairness{Objectives: map[string]int{"interactive": 10}, Tenants: []extproc.Tenant{{Name: "a"}}}})
	if res := do(t, h, context.Background(), fairReq("x", "a", "interactive")); res.Status != 200 {
		t.Fatalf("%d %s", res.Status, res.Details)
	}
	d := h.srv.Decisions().Recent(extproc.Filter{Limit: 1})
	if len(d) != 1 || d[0].Priority != 0 || d[0].Tenant != "a" {
		t.Fatalf("decisions %+v, want tenant a at priority 0", d)
	}
}

// TestFairShares runs tenants with different numbers of clients, each
// client sending its next request as soon as its last is answered, so
// that every tenant always has requests waiting, and measures what each
// was served. Equal weights share equally however many clients each
// has (Jain's index at least 0.95), where one FIFO shares by clients;
// weights 1 and 3 share 1:3 within 5%.
func TestFairShares(t *testing.T) {
	if testing.Short() {
		t.Skip("a long run")
	}
	equal := []extproc.Tenant{{Name: "t4"}, {Name: "t8"}, {Name: "t16"}, {Name: "t32"}}
	clients := map[string]int{"t4": 4, "t8": 8, "t16": 16, "t32": 32}
	t.Run("equal weights", func(t *testing.T) {
		got := shares(t, extproc.Fairness{Tenants: equal}, clients)
		var xs []float64
		for _, n := range got {
			xs = append(xs, float64(n))
		}
		j := jain(xs)
		t.Logf("served %v, Jain's index %.3f", got, j)
		if j < 0.95 {
			t.Errorf("Jain's index %.3f, want at least 0.95 (served %v)", j, got)
		}
	})
	t.Run("one FIFO, for comparison", func(t *testing.T) {
		// Every tenant unknown: they share the default flow.
		got := shares(t, extproc.Fairness{}, clients)
		var xs []float64
		for _, n := range got {
			xs = append(xs, float64(n))
		}
		j := jain(xs)
		t.Logf("served %v, Jain's index %.3f", got, j)
		// Served by clients, 4:8:16:32, the index is 0.66.
		if j > 0.8 {
			t.Errorf("one FIFO served %v (Jain's index %.3f): not by clients", got, j)
		}
	})
	t.Run("weights 1 and 3", func(t *testing.T) {
		got := shares(t, extproc.Fairness{Tenants: []extproc.Tenant{{Name: "w1", Weight: 1}, {Name: "w3", Weight: 3}}},
			map[string]int{"w1": 8, "w3": 8})
		r := float64(got["w3"]) / float64(got["w1"])
		t.Logf("served %v, ratio %.3f", got, r)
		if r < 3*0.95 || r > 3*1.05 {
			t.Errorf("w3:w1 served %.3f, want 3 within 5%% (served %v)", r, got)
		}
	})
}

// shares runs the clients of each tenant against one model of two slots
// until 1,200 requests have been answered, and counts what each tenant
// had answered after the first 200 (the warm-up). Tenants are counted by
// the requests' own tenant header, whatever flow they went in.
func shares(t *testing.T, f extproc.Fairness, clients map[string]int) map[string]uint64 {
	const warm, total = 200, 1200
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(2, 1000, time.Minute)}}, extproc.Options{Fairness: f})
	ctx, cancel := context.WithCancel(context.Background())
	var mu sync.Mutex
	count, got := 0, map[string]uint64{}
	var wg sync.WaitGroup
	for tenant, n := range clients {
		for i := range n {
			wg.Go(func() {
				for ctx.Err() == nil {
					res, err := h.env.Do(ctx, fairReq(fmt.Sprint(tenant, "-", i), tenant, ""))
					if err != nil || res.Status != 200 {
						continue // stopped
					}
					mu.Lock()
					if count++; count > warm && count <= total {
						got[tenant]++
					}
					if count == total {
						cancel()
					}
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	cancel()
	return got
}

// jain is Jain's fairness index: 1 when all are equal, 1/n when one has
// everything.
func jain(xs []float64) float64 {
	var sum, sq float64
	for _, x := range xs {
		sum += x
		sq += x * x
	}
	return sum * sum / (float64(len(xs)) * sq)
}

// TestFairReloadWhileWaiting: a reload of the fairness settings while
// requests wait keeps every one of them, each in its flow under the new
// settings (a tenant no longer configured in the shared flow, an
// objective no longer configured at priority 0), in the order they came
// within a flow, and loses no slot.
func TestFairReloadWhileWaiting(t *testing.T) {
	h := startEdited(t, []extproc.Model{{Name: "llama", Limits: limits(1, 10, time.Minute)}}, keepObjective,
		extproc.Options{Fairness: extproc.Fairness{Objectives: map[string]int{"interactive": 10, "batch": -10},
			Tenants: []extproc.Tenant{{Name: "a"}, {Name: "b"}}}})
	waiters := []queuedReq{{"b1", "b", "batch"}, {"a1", "a", "interactive"}, {"b2", "b", ""}, {"a2", "a", "batch"}, {"a3", "a", "interactive"}}
	s, done := queueBehind(t, h, waiters)
	// b is no longer a tenant; batch no longer an objective.
	h.srv.SetFairness(extproc.Fairness{Objectives: map[string]int{"interactive": 10}, Tenants: []extproc.Tenant{{Name: "a"}}})
	st := h.stats(t, "llama")
	if st.Queued != len(waiters) || len(st.Bands) != 2 || st.Bands[0].Queued != 2 || st.Bands[1].Queued != 3 {
		t.Fatalf("after the reload: %d queued, bands %+v; want a1 and a3 at 10, the rest at 0", st.Queued, st.Bands)
	}
	order := s.serveEach(len(waiters))
	// Priority 10 first (a's, in order), then priority 0: the shared flow
	// (b1, b2) and a (a2) take turns, the shared flow first as it came first.
	if got, want := strings.Join(order, " "), "a1 a3 b1 a2 b2"; got != want {
		t.Errorf("served %s, want %s", got, want)
	}
	s.endAll(done, len(waiters)+1)
	h.idle(t, "llama")
}
