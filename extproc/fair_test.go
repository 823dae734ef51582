package extproc

import (
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

// fairTable has three priorities (interactive 10, the default 0, batch
// -10) and tenants a (weight 1), b (weight 3, at most 2 waiting) and c.
func fairTable(vtc bool) *flowTable {
	return newFlowTable(Fairness{
		Objectives: map[string]int{"interactive": 10, "batch": -10},
		Tenants:    []Tenant{{Name: "a", Weight: 1, MaxQueue: -1}, {Name: "b", Weight: 3, MaxQueue: 2}, {Name: "c", MaxQueue: -1}},
		VTC:        vtc,
	}, nil)
}

// fkey is the flow of tenant (a header value) at objective.
func fkey(t *flowTable, tenant, objective string) flowKey {
	var ten, obj []byte
	if tenant != "" {
		ten = []byte(tenant)
	}
	if objective != "" {
		obj = []byte(objective)
	}
	return t.key(ten, obj)
}

// queued is one waiter with what it was queued as.
type queued struct {
	w    *waiter
	name string
}

// fill takes every slot of g, then queues a waiter per name, each name
// being "tenant/objective/label", in order; it fails the test unless each
// is queued.
func fill(t *testing.T, g *gate, names ...string) []queued {
	t.Helper()
	now := time.Now()
	for g.tryAcquire(now, flowKey{}, 0) {
	}
	var out []queued
	for _, n := range names {
		parts := strings.SplitN(n, "/", 3)
		w := newWaiter()
		if res, _ := g.enqueue(w, now, fkey(g.table, parts[0], parts[1]), 1); res != enqueued {
			t.Fatalf("%s: %v, want queued", n, res)
		}
		out = append(out, queued{w, n})
	}
	return out
}

// grants releases n slots and returns whom they went to, in order.
func grants(t *testing.T, g *gate, qs []queued, n int) []string {
	t.Helper()
	var got []string
	for range n {
		g.release(0)
		for _, q := range qs {
			if signalled(q.w) {
				if q.w.state != granted {
					t.Fatalf("%s signalled %v, want granted", q.name, q.w.state)
				}
				got = append(got, q.name)
			}
		}
	}
	return got
}

func TestGateBandsAndTurns(t *testing.T) {
	tests := []struct {
		name    string
		slots   int
		waiters []string
		want    []string
	}{
		{"higher priority first, FIFO inside a tenant", 1,
			[]string{"a/batch/1", "a//2", "a/interactive/3", "a/batch/4", "a/interactive/5"},
			[]string{"a/interactive/3", "a/interactive/5", "a//2", "a/batch/1", "a/batch/4"}},
		{"tenants take turns", 1,
			[]string{"a//1", "a//2", "a//3", "c//1", "c//2"},
			[]string{"a//1", "c//1", "a//2", "c//2", "a//3"}},
		{"a late tenant is served in the next turn, not behind the backlog", 1,
			[]string{"a//1", "a//2", "a//3", "a//4", "a//5", "c//1"},
			[]string{"a//1", "c//1", "a//2", "a//3", "a//4", "a//5"}},
		{"weight 3 takes three per turn", 1,
			[]string{"a//1", "a//2", "a//3", "b//1", "b//2"},
			[]string{"a//1", "b//1", "b//2", "a//2", "a//3"}},
		{"unknown tenants share the default flow", 1,
			[]string{"x//1", "y//1", "x//2", "a//1"},
			[]string{"x//1", "a//1", "y//1", "x//2"}},
		{"an unknown objective is priority 0", 1,
			[]string{"a/batch/1", "a/nonesuch/2", "a/interactive/3"},
			[]string{"a/interactive/3", "a/nonesuch/2", "a/batch/1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := newGate(Limits{MaxConcurrent: tt.slots, MaxQueue: 100}, fairTable(false))
			qs := fill(t, g, tt.waiters...)
			if got := grants(t, g, qs, len(tt.want)); !slices.Equal(got, tt.want) {
				t.Errorf("granted %v\nwant    %v", got, tt.want)
			}
			checkGate(t, g)
		})
	}
}

// TestGateWeights: under saturation a tenant of weight 3 is served three
// requests to one of weight 1, and equal tenants alike.
func TestGateWeights(t *testing.T) {
	g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 1000}, fairTable(false))
	var names []string
	for i := range 200 {
		names = append(names, "a//"+string(rune('0'+i%10)), "b//x", "c//y")
	}
	g.table.tenants[2].maxQueue = 0 // b uncapped for this test
	qs := fill(t, g, names...)
	served := map[string]int{}
	for _, n := range grants(t, g, qs, 250) {
		served[n[:1]]++
	}
	// 250 grants over weights 1:3:1 are 50:150:50.
	if served["a"] != 50 || served["b"] != 150 || served["c"] != 50 {
		t.Errorf("served %v, want a 50, b 150, c 50", served)
	}
	checkGate(t, g)
}

func TestGateCapsAndDisplacement(t *testing.T) {
	now := time.Now()
	t.Run("a tenant's cap", func(t *testing.T) {
		g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 10}, fairTable(false))
		fill(t, g, "b//1", "b//2")
		if res, _ := g.enqueue(newWaiter(), now, fkey(g.table, "b", ""), 1); res != tenantFull {
			t.Fatalf("b's third: %v, want tenantFull", res)
		}
		if res, _ := g.enqueue(newWaiter(), now, fkey(g.table, "b", "interactive"), 1); res != tenantFull {
			t.Fatalf("b's third at another priority: %v, want tenantFull (the cap is the tenant's)", res)
		}
		if res, _ := g.enqueue(newWaiter(), now, fkey(g.table, "a", ""), 1); res != enqueued {
			t.Fatalf("a: %v, want queued", res)
		}
		checkGate(t, g)
	})
	t.Run("a higher priority displaces the lowest band's newest", func(t *testing.T) {
		g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 3}, fairTable(false))
		qs := fill(t, g, "a/batch/1", "c/batch/2", "a//3")
		w := newWaiter()
		if res, depth := g.enqueue(w, now, fkey(g.table, "a", "interactive"), 1); res != enqueued || depth != 3 {
			t.Fatalf("interactive arrival: %v depth %d, want queued at 3", res, depth)
		}
		if !signalled(qs[1].w) || qs[1].w.state != displaced {
			t.Fatal("the newest batch waiter was not displaced")
		}
		if g.abandon(qs[1].w) != displaced {
			t.Fatal("abandon of a displaced waiter must say so")
		}
		if signalled(qs[0].w) || signalled(qs[2].w) {
			t.Fatal("another waiter was signalled")
		}
		// A default-priority arrival displaces the remaining batch one.
		if res, _ := g.enqueue(newWaiter(), now, fkey(g.table, "c", ""), 1); res != enqueued || qs[0].w.state != displaced {
			t.Fatalf("default arrival: %v, batch waiter %v", res, qs[0].w.state)
		}
		// Nothing lower is left: a batch arrival is refused, and so is a
		// default one of the tenant with the most waiting.
		if res, _ := g.enqueue(newWaiter(), now, fkey(g.table, "c", "batch"), 1); res != full {
			t.Fatalf("batch arrival into a full queue: %v, want full", res)
		}
		checkGate(t, g)
		st := g.stats()
		if d := flowStat(st, -10, "c").Displaced; d != 1 {
			t.Errorf("c's batch flow counts %d displaced, want 1", d)
		}
		if r := flowStat(st, -10, "c").Rejected; r != 1 {
			t.Errorf("c's batch flow counts %d rejected, want 1", r)
		}
	})
	t.Run("in one band, the tenant furthest over its share gives way", func(t *testing.T) {
		g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 4}, fairTable(false))
		qs := fill(t, g, "a//1", "a//2", "a//3", "a//4")
		if res, _ := g.enqueue(newWaiter(), now, fkey(g.table, "c", ""), 1); res != enqueued || qs[3].w.state != displaced {
			t.Fatalf("c's first: %v, a's newest %v; want queued and displaced", res, qs[3].w.state)
		}
		if res, _ := g.enqueue(newWaiter(), now, fkey(g.table, "c", ""), 1); res != enqueued || qs[2].w.state != displaced {
			// a has 3, c would have 2 with this one: a is further over.
			t.Fatalf("c's second: %v, a's newest %v; want queued and displaced", res, qs[2].w.state)
		}
		if res, _ := g.enqueue(newWaiter(), now, fkey(g.table, "c", ""), 1); res != full {
			// Two each: c would be the one further over.
			t.Fatalf("c's third: %v, want full", res)
		}
		if res, _ := g.enqueue(newWaiter(), now, fkey(g.table, "a", ""), 1); res != full {
			t.Fatalf("a's fifth: %v, want full", res)
		}
		checkGate(t, g)
	})
	t.Run("a lower priority displaces no one", func(t *testing.T) {
		g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 2}, fairTable(false))
		fill(t, g, "a/interactive/1", "a/interactive/2")
		if res, _ := g.enqueue(newWaiter(), now, fkey(g.table, "c", ""), 1); res != full {
			t.Fatalf("default arrival under a full interactive queue: %v, want full", res)
		}
	})
}

// flowStat finds a tenant's flow at a priority in st.
func flowStat(st GateStats, priority int, tenant string) FlowStats {
	for _, b := range st.Bands {
		if b.Priority == priority {
			for _, f := range b.Tenants {
				if f.Tenant == tenant {
					return f
				}
			}
		}
	}
	return FlowStats{}
}

// TestGateVTC: charged by bytes, a tenant of small requests is served
// more of them than one of large requests, so that bytes served even out;
// and a tenant that comes back after idling gains no credit.
func TestGateVTC(t *testing.T) {
	g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 1000}, fairTable(true))
	now := time.Now()
	for g.tryAcquire(now, flowKey{}, 0) {
	}
	var qs []queued
	for range 100 {
		for _, x := range []struct {
			tenant string
			cost   int
		}{{"a", 1000}, {"c", 100}} {
			w := newWaiter()
			if res, _ := g.enqueue(w, now, fkey(g.table, x.tenant, ""), x.cost); res != enqueued {
				t.Fatal(res)
			}
			qs = append(qs, queued{w, x.tenant})
		}
	}
	bytes := map[string]int{}
	for _, n := range grants(t, g, qs, 55) {
		bytes[n] += map[string]int{"a": 1000, "c": 100}[n]
	}
	if bytes["a"] < 4000 || bytes["a"] > 6000 || bytes["c"] < 4000 || bytes["c"] > 6000 {
		t.Errorf("bytes served %v, want about 5000 each", bytes)
	}
	checkGate(t, g)
}

// TestGateSetTable: a new fairness moves the waiters to their flows under
// it, in the order they came, and carries the counts.
func TestGateSetTable(t *testing.T) {
	g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 100}, fairTable(false))
	qs := fill(t, g, "a/batch/1", "c//2", "a/interactive/3", "c//4")
	// c is no longer configured, batch no longer an objective.
	g.setTable(newFlowTable(Fairness{Objectives: map[string]int{"interactive": 10}, Tenants: []Tenant{{Name: "a", MaxQueue: -1}}}, nil))
	checkGate(t, g)
	want := []string{"a/interactive/3", "a/batch/1", "c//2", "c//4"}
	if got := grants(t, g, qs, 4); !slices.Equal(got, want) {
		t.Errorf("granted %v, want %v", got, want)
	}
	if a := flowStat(g.stats(), 0, "a").Admitted; a != 1 {
		t.Errorf("a at priority 0 admitted %d, want 1 (its batch request)", a)
	}
}

// TestGateRandom runs random arrivals, releases and abandons against the
// gate and checks after each step that its books balance, that every
// grant went to the highest priority waiting and, in it, to the oldest
// waiter of its tenant, and that every waiter hears once at most.
func TestGateRandom(t *testing.T) {
	for seed := range uint64(50) {
		rng := rand.New(rand.NewPCG(seed, 1))
		vtc := seed%2 == 1
		g := newGate(Limits{MaxConcurrent: 1 + rng.IntN(3), MaxQueue: rng.IntN(20)}, fairTable(vtc))
		tenants := []string{"a", "b", "c", "x", ""}
		objectives := []string{"interactive", "", "batch"}
		type entry struct {
			w      *waiter
			key    flowKey
			seq    int
			closed bool
		}
		var live []*entry
		held, seq := 0, 0
		now := time.Now()
		for step := range 3000 {
			switch op := rng.IntN(10); {
			case op < 5: // a request arrives
				k := fkey(g.table, tenants[rng.IntN(len(tenants))], objectives[rng.IntN(len(objectives))])
				w := newWaiter()
				switch res, _ := g.enqueue(w, now, k, 1+rng.IntN(2000)); res {
				case admitted:
					held++
				case enqueued:
					seq++
					live = append(live, &entry{w: w, key: k, seq: seq})
				}
			case op < 8 && held > 0: // a request ends
				g.release(0)
				held--
			case op < 9 && len(live) > 0: // a waiter gives up
				e := live[rng.IntN(len(live))]
				if e.closed {
					continue
				}
				giveUp(g, e.w)
				e.closed = true
			default:
				g.setLimits(Limits{MaxConcurrent: 1 + rng.IntN(3), MaxQueue: rng.IntN(20)})
			}
			// Collect grants and displacements; check grant order.
			for _, e := range live {
				if e.closed || !signalled(e.w) {
					continue
				}
				e.closed = true
				if e.w.state != granted {
					continue
				}
				held++
				for _, o := range live {
					if !o.closed && o.w.state == waiting && o.key.band < e.key.band {
						t.Fatalf("seed %d step %d: a waiter of band %d was granted while one of band %d waited", seed, step, e.key.band, o.key.band)
					}
					if !o.closed && o.w.state == waiting && o.key == e.key && o.seq < e.seq {
						t.Fatalf("seed %d step %d: a tenant's newer waiter was granted before its older one", seed, step)
					}
				}
			}
			if g.inflight != held {
				t.Fatalf("seed %d step %d: gate holds %d, callers %d", seed, step, g.inflight, held)
			}
			checkGate(t, g)
		}
	}
}

// giveUp abandons w as its request's stream does (leaveQueue): a slot
// handed over is given back, a word received.
func giveUp(g *gate, w *waiter) {
	switch g.abandon(w) {
	case granted:
		<-w.ready
		g.release(0)
	case displaced:
		<-w.ready
	}
}

// checkGate checks that g's counts and links agree.
func checkGate(t *testing.T, g *gate) {
	t.Helper()
	g.mu.Lock()
	defer g.mu.Unlock()
	total := 0
	tenants := make([]int, len(g.tenantQueued))
	for i := range g.bands {
		b := &g.bands[i]
		n, ring := 0, 0
		for _, f := range b.flows {
			if f == nil {
				continue
			}
			n += f.q.len
			if f.maxQueue > 0 {
				tenants[f.tenant] += f.q.len
			}
			if (f.q.len > 0) != (f.next != nil) {
				t.Fatalf("band %d tenant %d: %d waiters, in the ring %v", i, f.tenant, f.q.len, f.next != nil)
			}
			count := 0
			for w := f.q.head; w != nil; w = w.next {
				if w.flow != f || w.state != waiting {
					t.Fatalf("a waiter in the wrong flow or state %v", w.state)
				}
				count++
			}
			if count != f.q.len {
				t.Fatalf("flow lists %d waiters, counts %d", count, f.q.len)
			}
		}
		if b.cursor != nil {
			for x := b.cursor; ; {
				ring++
				if x.next.prev != x {
					t.Fatal("ring links disagree")
				}
				if x = x.next; x == b.cursor {
					break
				}
			}
		}
		active := 0
		for _, f := range b.flows {
			if f != nil && f.q.len > 0 {
				active++
			}
		}
		if ring != active || n != b.len {
			t.Fatalf("band %d: ring %d of %d waiting flows, %d waiters counted %d", i, ring, active, n, b.len)
		}
		total += n
	}
	if total != g.queueLen || int(g.queued.Load()) != total || !slices.Equal(tenants, g.tenantQueued) {
		t.Fatalf("queue %d, counted %d, mirror %d; tenants %v counted %v", total, g.queueLen, g.queued.Load(), tenants, g.tenantQueued)
	}
}

// TestFlowKey: tenants and priorities by header value, a key's id in
// place of the key, and nothing allocated.
func TestFlowKey(t *testing.T) {
	// printf %s sk-test-1 | sha256sum | cut -c1-16
	const keyID = "sha256:db567a0dd8d24a1a"
	byKey := newFlowTable(Fairness{TenantHeader: "authorization", Tenants: []Tenant{{Name: keyID}}, Objectives: map[string]int{"hi": 5}}, nil)
	tests := []struct {
		name              string
		t                 *flowTable
		tenant, objective string
		wantTenant        string
		wantPriority      int
	}{
		{"configured tenant and objective", fairTable(false), "b", "interactive", "b", 10},
		{"no headers", fairTable(false), "", "", DefaultTenant, 0},
		{"unknown tenant and objective", fairTable(false), "zed", "urgent", DefaultTenant, 0},
		{"the shared flow by name", fairTable(false), DefaultTenant, "batch", DefaultTenant, -10},
		{"a bearer key", byKey, "Bearer sk-test-1", "hi", keyID, 5},
		{"a bare key", byKey, "sk-test-1", "", keyID, 0},
		{"another key", byKey, "Bearer sk-test-2", "", DefaultTenant, 0},
		{"a key's id sent as the key", byKey, keyID, "", DefaultTenant, 0},
		{"an empty bearer", byKey, "Bearer ", "", DefaultTenant, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := fkey(tt.t, tt.tenant, tt.objective)
			if got, p := k.t.tenants[k.tenant].name, k.t.priorities[k.band]; got != tt.wantTenant || p != tt.wantPriority {
				t.Errorf("tenant %q priority %d, want %q %d", got, p, tt.wantTenant, tt.wantPriority)
			}
			ten, obj := []byte(tt.tenant), []byte(tt.objective)
			if n := testing.AllocsPerRun(50, func() { tt.t.key(ten, obj) }); n != 0 {
				t.Errorf("%v allocs", n)
			}
		})
	}
}

// reloadTables are four fairness settings, each made from the one
// before (budgets carried), for reloads.
func reloadTables() []*flowTable {
	var ts []*flowTable
	var prev *flowTable
	for _, f := range []Fairness{
		{Objectives: map[string]int{"interactive": 10, "batch": -10}, Tenants: []Tenant{{Name: "a", Weight: 1, MaxQueue: -1}, {Name: "b", Weight: 3, MaxQueue: 2}, {Name: "c", MaxQueue: -1}}},
		{Objectives: map[string]int{"interactive": 10}, Tenants: []Tenant{{Name: "a", MaxQueue: 1}}, VTC: true},
		{},
		{Objectives: map[string]int{"batch": -10, "x": 5, "y": 7}, Tenants: []Tenant{{Name: "c", Weight: 5, MaxQueue: 3}, {Name: "b", MaxQueue: -1}, {Name: DefaultTenant, MaxQueue: 4}}, MaxQueuePerTenant: 2, VTC: true},
	} {
		t := newFlowTable(f, prev)
		ts = append(ts, t)
		prev = t
	}
	return ts
}

// TestGateRandomReload: random arrivals (their flows read under any of
// the tables, as a request that read its headers before a reload),
// releases, abandons, limits and reloads; after each step the books
// balance, no slot is free while a request waits, and in the end every
// waiter has heard once.
func TestGateRandomReload(t *testing.T) {
	for seed := range uint64(40) {
		rng := rand.New(rand.NewPCG(seed, 7))
		tables := reloadTables()
		g := newGate(Limits{MaxConcurrent: 1 + rng.IntN(3), MaxQueue: rng.IntN(20)}, tables[0])
		tenants := []string{"a", "b", "c", "x", ""}
		objectives := []string{"interactive", "", "batch", "x", "y"}
		type entry struct {
			w      *waiter
			closed bool
		}
		var live []*entry
		held := 0
		now := time.Now()
		for step := range 2000 {
			switch op := rng.IntN(12); {
			case op < 5:
				// a flow read under a random (perhaps stale) table
				kt := tables[rng.IntN(len(tables))]
				k := fkey(kt, tenants[rng.IntN(len(tenants))], objectives[rng.IntN(len(objectives))])
				if rng.IntN(4) == 0 && g.tryAcquire(now, k, rng.IntN(3)) {
					held++
					continue
				}
				w := newWaiter()
				switch res, _ := g.enqueue(w, now, k, rng.IntN(2000)); res {
				case admitted:
					held++
				case enqueued:
					live = append(live, &entry{w: w})
				}
			case op < 8 && held > 0:
				g.release(0)
				held--
			case op < 9 && len(live) > 0:
				e := live[rng.IntN(len(live))]
				if e.closed {
					continue
				}
				giveUp(g, e.w)
				e.closed = true
			case op < 10:
				g.setTable(tables[rng.IntN(len(tables))])
			default:
				g.setLimits(Limits{MaxConcurrent: 1 + rng.IntN(3), MaxQueue: rng.IntN(20)})
			}
			for _, e := range live {
				if !e.closed && signalled(e.w) {
					e.closed = true
					if e.w.state == granted {
						held++
					}
				}
			}
			if g.inflight != held {
				t.Fatalf("seed %d step %d: gate holds %d, callers %d", seed, step, g.inflight, held)
			}
			checkGate(t, g)
			// no waiter while a slot is free
			if g.inflight < g.limits.MaxConcurrent && g.queueLen > 0 {
				t.Fatalf("seed %d step %d: free slot with waiters", seed, step)
			}
		}
		// Drain: every live waiter must be heard.
		for held > 0 {
			g.release(0)
			held--
			for _, e := range live {
				if !e.closed && signalled(e.w) {
					e.closed = true
					if e.w.state == granted {
						held++
					}
				}
			}
		}
		for _, e := range live {
			if !e.closed {
				t.Fatalf("seed %d: a waiter was never heard (state %v)", seed, e.w.state)
			}
		}
		checkGate(t, g)
	}
}

// TestGateReloadKeepsCounts: a reload that takes a tenant or a priority
// away keeps the counts of its flows in the sums by priority and by
// tenant that stay, so that no count metrics report goes down, and none
// jumps into another flow's.
func TestGateReloadKeepsCounts(t *testing.T) {
	g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 10}, fairTable(false))
	now := time.Now()
	for _, k := range []flowKey{fkey(g.table, "c", ""), fkey(g.table, "a", "batch"), fkey(g.table, "a", ""), fkey(g.table, "x", "")} {
		if !g.tryAcquire(now, k, 1) {
			t.Fatal("no slot")
		}
		g.release(0)
	}
	sums := func(st GateStats) (byPriority map[int]uint64, byTenant map[string]uint64) {
		byPriority, byTenant = map[int]uint64{}, map[string]uint64{}
		for _, f := range st.GonePriorities {
			byTenant[f.Tenant] += f.Admitted
		}
		for _, b := range st.Bands {
			byPriority[b.Priority] += b.GoneTenants.Admitted
			for _, f := range b.Tenants {
				byPriority[b.Priority] += f.Admitted
				byTenant[f.Tenant] += f.Admitted
			}
		}
		return byPriority, byTenant
	}
	p0, t0 := sums(g.stats())
	// c is no longer a tenant, batch no longer an objective.
	g.setTable(newFlowTable(Fairness{Objectives: map[string]int{"interactive": 10}, Tenants: []Tenant{{Name: "a", MaxQueue: -1}}}, g.table))
	p1, t1 := sums(g.stats())
	if p1[0] != p0[0] || t1["a"] != t0["a"] || t1[DefaultTenant] != t0[DefaultTenant] {
		t.Errorf("by priority %v then %v; by tenant %v then %v: priority 0, a and default-flow must keep theirs", p0, p1, t0, t1)
	}
	if p1[0] != 3 || t1["a"] != 2 || t1[DefaultTenant] != 1 {
		t.Errorf("by priority %v, by tenant %v; want 3 at priority 0, a 2, default-flow 1", p1, t1)
	}
}
