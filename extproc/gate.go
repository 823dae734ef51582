package extproc

import (
	"cmp"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Limits bounds the admission of one model's requests.
type Limits struct {
	// MaxConcurrent is how many requests may be in flight at once.
	MaxConcurrent int
	// MaxQueue is how many requests may wait for a slot; one more is 429.
	MaxQueue int
	// QueueTimeout is the longest a request waits for a slot; then 504.
	QueueTimeout time.Duration
}

// admitResult is what a gate says to a request that asks for a slot.
type admitResult uint8

const (
	admitted   admitResult = iota // the slot is the caller's
	enqueued                      // the caller waits on its waiter
	full                          // no slot and no room to wait: 429
	tenantFull                    // the tenant has as many waiting as it may: 429
)

// A gate is one model's admission state: a counting semaphore in front of
// fair queues of waiters (see Fairness). Waiters queue in bands, one per
// priority, and within a band in flows, one per tenant; a freed slot goes
// to the highest band that has waiters, and in it to the flow whose turn
// it is (weighted round robin, or VTC), and in it to the oldest waiter.
// Every operation but VTC's choice and displacement is O(1) under a mutex
// that guards counters and links only; nothing logs, allocates (past a
// flow's first request) or blocks while holding it, so admission costs
// the same with 10,000 waiters as with none.
type gate struct {
	mu       sync.Mutex
	limits   Limits
	inflight int
	// table is the fairness in force; bands are indexed as its
	// priorities, each band's flows as its tenants, and so is
	// tenantQueued, each capped tenant's waiters over all bands.
	table        *flowTable
	vtc          bool // table.vtc
	bands        []band
	tenantQueued []int
	queueLen     int
	seq          uint64 // arrival order of waiters, for a band's newest
	// goneTenants and gonePriorities keep the counts of flows a reload
	// took away, by the priority and by the tenant that stayed, so that
	// the counts by priority and by tenant never go down (see setTable).
	goneTenants    map[int]flowCounts    // by priority: tenants no longer configured
	gonePriorities map[string]flowCounts // by tenant: priorities no longer configured
	completed      uint64                // requests released so far, for the rate estimate
	rate           rateEstimate
	// For Retry-After (retryAfter): since when a slot has been taken
	// without a break (inflight above 0), the model's service time (an
	// average of the requests it served; 0 while none has been), and the
	// latest time a turned-away request was told to come back at.
	busySince time.Time
	served    time.Duration
	nextTurn  time.Time
	// queued mirrors queueLen for readers that must not take mu, such as
	// the queue-depth header on every response. Written under mu.
	queued atomic.Int64
}

// A band is the waiters of one priority.
type band struct {
	flows []*flow // by tenant; nil until the tenant's first request
	// cursor is the flow whose turn it is, in a ring of the flows that
	// have waiters (flow.prev, flow.next); nil while none has.
	cursor *flow
	len    int
	last   float64 // VTC: the counter of the flow served last
}

// A flow is one tenant's waiters in one band, oldest first.
type flow struct {
	q          waitList
	tenant     uint16
	band       uint8
	weight     int     // the tenant's
	maxQueue   int     // the tenant's cap; 0: none
	prev, next *flow   // the band's ring; nil while the flow has no waiters
	credit     int     // round robin: what is left of its turn
	counter    float64 // VTC: its service so far, over its weight
	counts     flowCounts
}

// flowCounts are what became of a flow's requests, for metrics.
type flowCounts struct {
	admitted  uint64 // given a slot, at once or after waiting
	displaced uint64 // taken out of the queue for a request that came later
	rejected  uint64 // turned away on arrival: the queue or the tenant's share was full, or its budget spent
}

func (c flowCounts) plus(d flowCounts) flowCounts {
	return flowCounts{c.admitted + d.admitted, c.displaced + d.displaced, c.rejected + d.rejected}
}

// A waiter is one request queued at a gate. Waiters are pooled: a queued
// request is the slow path, but under overload every request takes it.
type waiter struct {
	prev, next *waiter
	flow       *flow // the flow it waits in; guarded by gate.mu
	seq        uint64
	cost       int       // VTC's charge: the request's bytes
	state      waitState // guarded by gate.mu until ready receives
	ready      chan struct{}
}

// waitState is where a waiter stands.
type waitState uint8

const (
	waiting   waitState = iota + 1
	granted             // handed a slot: its owner must release it
	displaced           // taken out for a request that came later: 429
)

var waiterPool = sync.Pool{New: func() any { return &waiter{ready: make(chan struct{}, 1)} }}

func newGate(l Limits, t *flowTable) *gate {
	g := &gate{limits: l}
	g.setTableLocked(t)
	return g
}

// flowLocked returns k's flow, making it on the tenant's first request in
// the band.
func (g *gate) flowLocked(k flowKey) *flow {
	if k.t != g.table {
		k = k.translate(g.table)
	}
	b := &g.bands[k.band]
	f := b.flows[k.tenant]
	if f == nil {
		spec := g.table.tenants[k.tenant]
		f = &flow{tenant: k.tenant, band: k.band, weight: spec.weight, maxQueue: spec.maxQueue}
		b.flows[k.tenant] = f
	}
	return f
}

// tryAcquire takes a slot for a request of flow k when one is free and
// nobody is waiting: a new request never overtakes a queued one. It is
// the whole admission cost of an unloaded model. cost is the request's
// bytes, which VTC charges.
func (g *gate) tryAcquire(now time.Time, k flowKey, cost int) bool {
	g.mu.Lock()
	ok := g.inflight < g.limits.MaxConcurrent && g.queueLen == 0
	if ok {
		g.takeLocked(now, g.flowLocked(k), cost)
	}
	g.mu.Unlock()
	return ok
}

// takeLocked takes a slot for a request of f.
func (g *gate) takeLocked(now time.Time, f *flow, cost int) {
	if g.inflight == 0 {
		g.busySince = now
	}
	g.inflight++
	f.counts.admitted++
	g.chargeLocked(f, cost)
}

// chargeLocked counts a request's service against its flow, for VTC.
func (g *gate) chargeLocked(f *flow, cost int) {
	if g.vtc {
		f.counter += float64(max(cost, 1)) / float64(f.weight)
		g.bands[f.band].last = f.counter
	}
}

// rejected counts a request of flow k turned away before it asked for a
// slot: its tenant was over budget.
func (g *gate) rejected(k flowKey) {
	g.mu.Lock()
	g.flowLocked(k).counts.rejected++
	g.mu.Unlock()
}

// enqueue is tryAcquire's slow path: it takes a slot if one has come free
// since, else queues w when there is room. Room is the model's max_queue
// and the tenant's cap. When the queue is full, a request displaces (see
// victimLocked) rather than being turned away where the queue is not
// fair to it: the displaced waiter's owner is told, and answers 429 as
// if its request had found the queue full. It samples the completion
// rate for Retry-After. depth is the queue length after the call.
func (g *gate) enqueue(w *waiter, now time.Time, k flowKey, cost int) (res admitResult, depth int) {
	g.mu.Lock()
	res = g.enqueueLocked(w, now, k, cost)
	depth = g.queueLen
	g.mu.Unlock()
	return res, depth
}

func (g *gate) enqueueLocked(w *waiter, now time.Time, k flowKey, cost int) admitResult {
	f := g.flowLocked(k)
	if g.inflight < g.limits.MaxConcurrent && g.queueLen == 0 {
		g.takeLocked(now, f, cost)
		return admitted
	}
	g.rate.sample(now, g.completed)
	if f.maxQueue > 0 && g.tenantQueued[f.tenant] >= f.maxQueue {
		f.counts.rejected++
		return tenantFull
	}
	if g.queueLen >= g.limits.MaxQueue {
		v := g.victimLocked(f)
		if v == nil {
			f.counts.rejected++
			return full
		}
		v.flow.counts.displaced++
		g.removeLocked(v)
		v.state = displaced
		v.ready <- struct{}{} // never blocks: capacity 1, one word per queuing
	}
	g.pushLocked(w, f, cost)
	return enqueued
}

// victimLocked chooses whom a request of f displaces from a full queue:
// the newest waiter of the lowest band below f's, as priority goes first;
// else, in f's band, the newest waiter of the tenant furthest over its
// share of the queue (waiters over weight), if that is further over than
// f's tenant would be with one more: the longest queue drop of fair
// buffer management, which keeps one tenant's flood from filling the
// queue for good. nil when it displaces no one.
func (g *gate) victimLocked(f *flow) *waiter {
	for i := len(g.bands) - 1; i > int(f.band); i-- {
		if b := &g.bands[i]; b.len > 0 {
			return b.newest()
		}
	}
	b := &g.bands[f.band]
	if b.cursor == nil {
		return nil
	}
	var worst *flow
	for x := b.cursor; ; {
		if x != f && (worst == nil || x.q.len*worst.weight > worst.q.len*x.weight) {
			worst = x
		}
		if x = x.next; x == b.cursor {
			break
		}
	}
	if worst != nil && worst.q.len*f.weight > (f.q.len+1)*worst.weight {
		return worst.q.tail
	}
	return nil
}

// newest is the band's latest arrival: the newest of its flows' tails.
func (b *band) newest() *waiter {
	var w *waiter
	for x := b.cursor; ; {
		if w == nil || x.q.tail.seq > w.seq {
			w = x.q.tail
		}
		if x = x.next; x == b.cursor {
			return w
		}
	}
}

// pushLocked queues w in f.
func (g *gate) pushLocked(w *waiter, f *flow, cost int) {
	g.queueLen++
	g.queued.Store(int64(g.queueLen))
	b := &g.bands[f.band]
	if f.q.len == 0 {
		g.activateLocked(b, f)
	}
	w.flow, w.seq, w.cost, w.state = f, g.seq, cost, waiting
	g.seq++
	f.q.pushBack(w)
	b.len++
	if f.maxQueue > 0 {
		g.tenantQueued[f.tenant]++
	}
}

// activateLocked puts a flow that has its first waiter in its band's
// ring, last in the round. Under VTC its counter is lifted to the least
// of those waiting (or the last served, if none waits), so that a tenant
// gains no credit by having been idle (Sheng et al., §4.1).
func (g *gate) activateLocked(b *band, f *flow) {
	f.credit = f.weight
	if b.cursor == nil {
		f.prev, f.next, b.cursor = f, f, f
		if g.vtc {
			f.counter = max(f.counter, b.last)
		}
		return
	}
	if g.vtc {
		least := b.cursor.counter
		for x := b.cursor.next; x != b.cursor; x = x.next {
			least = min(least, x.counter)
		}
		f.counter = max(f.counter, least)
	}
	c := b.cursor
	f.prev, f.next = c.prev, c
	c.prev.next = f
	c.prev = f
}

// removeLocked takes w out of the queue.
func (g *gate) removeLocked(w *waiter) {
	g.queueLen--
	g.queued.Store(int64(g.queueLen))
	f := w.flow
	b := &g.bands[f.band]
	f.q.remove(w)
	w.flow = nil
	b.len--
	if f.maxQueue > 0 {
		g.tenantQueued[f.tenant]--
	}
	if f.q.len > 0 {
		return
	}
	// The flow has no waiters left: out of the ring.
	if f.next == f {
		b.cursor = nil
	} else {
		f.prev.next, f.next.prev = f.next, f.prev
		if b.cursor == f {
			g.turnLocked(b, f.next)
		}
	}
	f.prev, f.next = nil, nil
}

// turnLocked gives the turn to f.
func (g *gate) turnLocked(b *band, f *flow) {
	b.cursor = f
	f.credit = f.weight
}

// turnOfLocked returns the band and flow whose turn it is: the highest
// band with waiters, and in it the flow the policy picks (round robin:
// the cursor's, which keeps the turn for as many requests as its weight;
// VTC: the least served). nil when nobody waits.
func (g *gate) turnOfLocked() (*band, *flow) {
	for i := range g.bands {
		b := &g.bands[i]
		if b.len == 0 {
			continue
		}
		f := b.cursor
		if g.vtc {
			for x := f.next; x != b.cursor; x = x.next {
				if x.counter < f.counter {
					f = x
				}
			}
		}
		return b, f
	}
	return nil, nil
}

// nextLocked takes the waiter whose turn it is out of the queue (the
// oldest of the flow turnOfLocked picks), counted admitted, and moves the
// turn on. nil when nobody waits.
func (g *gate) nextLocked() *waiter {
	b, f := g.turnOfLocked()
	if f == nil {
		return nil
	}
	w := f.q.head
	if !g.vtc && f.credit == 1 && f.next != f {
		// This grant ends f's turn: the next flow's oldest waiter is
		// the next one granted, unless a higher band's request comes
		// first. Reading its channel's length fetches it and its
		// channel now, alongside this grant's own, as unlinking a
		// FIFO's head fetches the next head.
		_ = len(f.next.q.head.ready)
	}
	g.removeLocked(w)
	f.counts.admitted++
	switch {
	case g.vtc:
		g.chargeLocked(f, w.cost)
		if f.next != nil {
			b.cursor = f.next // ties go round
		}
	case f.next != nil: // still waiting: the turn goes on or passes
		if f.credit--; f.credit <= 0 {
			g.turnLocked(b, f.next)
		}
	}
	return w
}

// depth is the number of requests waiting, read without the lock.
func (g *gate) depth() int { return int(g.queued.Load()) }

// release gives a slot back, handing it straight to the waiter whose turn
// it is if there is one. Each slot taken must be released exactly once.
// served is how long the model took to serve the request, 0 when it did
// not serve it (the request gave up, or no answer began).
func (g *gate) release(served time.Duration) {
	g.mu.Lock()
	g.completed++
	g.inflight--
	if served > 0 {
		if g.served == 0 {
			g.served = served
		} else {
			g.served += (served - g.served) * 3 / 10 // recent requests weigh most
		}
	}
	g.grantLocked()
	g.mu.Unlock()
}

// grantLocked hands free slots to waiters, in turn.
func (g *gate) grantLocked() {
	for g.inflight < g.limits.MaxConcurrent && g.queueLen > 0 {
		w := g.nextLocked()
		g.inflight++
		w.state = granted
		w.ready <- struct{}{} // never blocks: capacity 1, one word per queuing
	}
}

// abandon takes w out of the queue because its request gave up (timeout,
// client gone), and reports where it stood: waiting (taken out now), or
// granted or displaced, in which case a word is on w.ready for the caller
// to drain before reusing w, and a granted slot is the caller's to release.
func (g *gate) abandon(w *waiter) waitState {
	g.mu.Lock()
	defer g.mu.Unlock()
	st := w.state
	if st == waiting {
		g.removeLocked(w)
		w.state = 0
	}
	return st
}

// setLimits applies new limits. Raised concurrency admits waiters at once;
// lowered limits take effect as slots are released, and requests already
// queued keep their place even above a lowered MaxQueue.
func (g *gate) setLimits(l Limits) {
	g.mu.Lock()
	g.limits = l
	g.grantLocked()
	g.mu.Unlock()
}

// setTable puts new fairness in force. The waiters go on waiting, in the
// order they came, each in its flow under the new table (its tenant by
// name, or the shared one; its priority, or the default). A flow's counts
// carry over where the new table has its tenant and priority. Where it
// has only one of them, they are kept for that one (goneTenants,
// gonePriorities), so that a count by priority or by tenant neither
// jumps (folded into another flow's) nor drops (lost): Prometheus would
// read either as a burst.
func (g *gate) setTable(t *flowTable) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if t == g.table {
		return
	}
	old, oldBands := g.table, g.bands
	var ws []*waiter
	for i := range oldBands {
		for _, f := range oldBands[i].flows {
			if f != nil {
				ws = append(ws, f.q.all()...)
			}
		}
	}
	slices.SortFunc(ws, func(a, b *waiter) int { return cmp.Compare(a.seq, b.seq) })
	g.setTableLocked(t)
	goneT, goneP := map[int]flowCounts{}, map[string]flowCounts{}
	for p, c := range g.goneTenants {
		if slices.Contains(t.priorities, p) {
			goneT[p] = c
		}
	}
	for name, c := range g.gonePriorities {
		if _, ok := t.tenant(name); ok {
			goneP[name] = c
		}
	}
	for i := range oldBands {
		for _, f := range oldBands[i].flows {
			if f == nil {
				continue
			}
			name, p := old.tenants[f.tenant].name, old.priorities[f.band]
			_, keepT := t.tenant(name)
			keepP := slices.Contains(t.priorities, p)
			switch {
			case keepT && keepP:
				g.flowLocked(flowKey{t: old, tenant: f.tenant, band: f.band}).counts = f.counts
			case keepP:
				goneT[p] = goneT[p].plus(f.counts)
			case keepT:
				goneP[name] = goneP[name].plus(f.counts)
			}
		}
	}
	g.goneTenants, g.gonePriorities = goneT, goneP
	for _, w := range ws {
		k := flowKey{t: old, tenant: w.flow.tenant, band: w.flow.band}
		g.pushLocked(w, g.flowLocked(k), w.cost)
	}
}

// setTableLocked makes empty bands and flows for t.
func (g *gate) setTableLocked(t *flowTable) {
	g.table, g.vtc = t, t.vtc
	g.bands = make([]band, len(t.priorities))
	for i := range g.bands {
		g.bands[i].flows = make([]*flow, len(t.tenants))
	}
	g.tenantQueued = make([]int, len(t.tenants))
	g.queueLen = 0 // the mirror, queued, is left as it is: the waiters are queued again at once
}

// GateStats is a snapshot of one model's admission state.
type GateStats struct {
	Limits    Limits
	InFlight  int
	Queued    int
	Completed uint64
	// Rate is the observed completion rate in requests per second, or 0
	// when nothing has been observed yet.
	Rate float64
	// Bands are the model's queue by priority, highest first: every
	// priority, with the tenants that have sent it requests.
	Bands []BandStats
	// GonePriorities are, by tenant, the counts of its requests at
	// priorities a reload has since taken away.
	GonePriorities []FlowStats
}

// BandStats is one priority's share of a model's queue.
type BandStats struct {
	Priority int
	Queued   int
	Tenants  []FlowStats // by tenant name
	// GoneTenants counts the requests of tenants a reload has since
	// taken away (no Tenant, nothing queued).
	GoneTenants FlowStats
}

// FlowStats is one tenant's requests at one priority.
type FlowStats struct {
	Tenant                        string
	Queued                        int
	Admitted, Displaced, Rejected uint64
}

// getLimits returns the limits in force.
func (g *gate) getLimits() Limits {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.limits
}

// stats takes a snapshot. Under the lock it copies counters only, into
// one slice; names are looked up and sorted once the lock is let go.
func (g *gate) stats() GateStats {
	type flowSnap struct {
		band   uint8
		tenant uint16
		queued int
		counts flowCounts
	}
	g.mu.Lock()
	s := GateStats{Limits: g.limits, InFlight: g.inflight, Queued: g.queueLen, Completed: g.completed, Rate: g.rate.perSec}
	t, queued := g.table, make([]int, len(g.bands))
	var flows []flowSnap
	for i := range g.bands {
		queued[i] = g.bands[i].len
		for _, f := range g.bands[i].flows {
			if f != nil {
				flows = append(flows, flowSnap{f.band, f.tenant, f.q.len, f.counts})
			}
		}
	}
	goneT, goneP := g.goneTenants, g.gonePriorities // replaced whole, never written
	g.mu.Unlock()
	s.Bands = make([]BandStats, len(queued))
	for i := range queued {
		s.Bands[i] = BandStats{Priority: t.priorities[i], Queued: queued[i], GoneTenants: goneT[t.priorities[i]].stats("")}
	}
	for name, c := range goneP {
		s.GonePriorities = append(s.GonePriorities, c.stats(name))
	}
	for _, f := range flows {
		b := &s.Bands[f.band]
		fs := f.counts.stats(t.tenants[f.tenant].name)
		fs.Queued = f.queued
		b.Tenants = append(b.Tenants, fs)
	}
	for i := range s.Bands {
		slices.SortFunc(s.Bands[i].Tenants, func(a, b FlowStats) int { return strings.Compare(a.Tenant, b.Tenant) })
	}
	return s
}

// stats renders c as a tenant's.
func (c flowCounts) stats(tenant string) FlowStats {
	return FlowStats{Tenant: tenant, Admitted: c.admitted, Displaced: c.displaced, Rejected: c.rejected}
}

// busy reports whether the gate has a request in flight or waiting.
func (g *gate) busy() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.inflight > 0 || g.queueLen > 0
}

// MaxRetryAfter is the longest Retry-After vgw gives: the OpenAI Python
// SDK honours one of at most 60 s (and backs off on its own, at most 8 s,
// for a longer one); the Go SDK (v3.98, requestconfig.go
// parseRetryAfterHeader) one of at most 2 minutes, and gives up at once
// on a longer one. A client told 60 s comes back and is told its turn
// again.
const MaxRetryAfter = 60 * time.Second

// fallbackService is what retryAfter takes a request to last before it
// knows anything of the model's: short, so that the first turned-away
// clients come back soon and are told better once the requests in flight
// have shown how long they run.
const fallbackService = time.Second

// retryAfter tells a request turned away because the queue is full when
// to come back: at its own turn, one queue place freeing per request the
// model serves, so that turned-away clients come back spread out, each as
// a place frees, rather than all together into a full queue again, and
// the model is not left idle while they wait.
//
// A place frees every S/max_concurrent, S being the model's service
// time: the average of the requests it served, or, before the first one
// ends, twice the age of the oldest in flight (a request that has run
// for t is as likely as not to run another t), and at least a second.
// The first place frees in about half that, or what remains of the
// oldest request's S; each turned-away request is told the turn after
// the last one given. Turns are spread by up to 10% either way, and
// capped at MaxRetryAfter.
func (g *gate) retryAfter(now time.Time) time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	first, turn := g.turnsLocked(now)
	at := now.Add(first)
	if next := g.nextTurn.Add(turn); next.After(at) {
		at = next
	}
	g.nextTurn = at
	return spread(at.Sub(now))
}

// tenantRetryAfter tells a request turned away because its tenant has as
// many waiting as it may when to come back: about when the first of them
// will have been served, were they in the request's band: after the
// waiters of higher bands and the turns that come before its flow's in
// the band (what is left of the current turn, then each flow's weight,
// as far as its waiters go; under VTC a request of each flow served less
// so far). It gives out no turn (nextTurn stays): the queue has room for
// others.
func (g *gate) tenantRetryAfter(now time.Time, k flowKey) time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	first, turn := g.turnsLocked(now)
	f := g.flowLocked(k)
	ahead := 0
	for i := range int(f.band) {
		ahead += g.bands[i].len
	}
	if b := &g.bands[f.band]; b.cursor != nil {
		for x := b.cursor; ; {
			switch {
			case x == f && !g.vtc:
				return spread(first + time.Duration(ahead)*turn) // its turn comes
			case g.vtc && x != f && (f.next == nil || x.counter < f.counter):
				ahead++
			case !g.vtc && x == b.cursor:
				ahead += min(x.credit, x.q.len)
			case !g.vtc:
				ahead += min(x.weight, x.q.len)
			}
			if x = x.next; x == b.cursor {
				break
			}
		}
	}
	return spread(first + time.Duration(ahead)*turn)
}

// turnsLocked is how soon the first queue place frees, and how often one
// frees after that (see retryAfter).
func (g *gate) turnsLocked(now time.Time) (first, turn time.Duration) {
	service := g.served
	slots := time.Duration(max(1, g.limits.MaxConcurrent))
	if service == 0 {
		var age time.Duration
		if g.inflight > 0 {
			age = now.Sub(g.busySince)
		}
		service = max(fallbackService, 2*age)
		first = max(service-age, service/slots/4)
	} else {
		first = service / slots / 2
	}
	return first, service / slots
}

// spread spreads a wait by up to 10% either way, within 100 ms and
// MaxRetryAfter.
func spread(d time.Duration) time.Duration {
	d += time.Duration((rand.Float64()*2 - 1) * 0.1 * float64(d))
	return min(MaxRetryAfter, max(100*time.Millisecond, d))
}

// rateEstimate is an exponentially weighted completion rate. It is sampled
// only on the queueing path, never on admit or release: a model whose queue
// is full has been queueing for a while, so the estimate is fresh exactly
// when Retry-After needs it.
type rateEstimate struct {
	mark      time.Time // when count was last sampled
	markCount uint64
	perSec    float64
	known     bool
}

// rateWindow is the shortest interval between samples; rateTau is the time
// constant of the average (older samples weigh e^(-age/rateTau)).
const (
	rateWindow = time.Second
	rateTau    = 10 * time.Second
)

func (r *rateEstimate) sample(now time.Time, completed uint64) {
	if r.mark.IsZero() {
		r.mark, r.markCount = now, completed
		return
	}
	dt := now.Sub(r.mark)
	if dt < rateWindow {
		return
	}
	inst := float64(completed-r.markCount) / dt.Seconds()
	if !r.known {
		r.perSec, r.known = inst, true
	} else {
		alpha := 1 - math.Exp(-dt.Seconds()/rateTau.Seconds())
		r.perSec += alpha * (inst - r.perSec)
	}
	r.mark, r.markCount = now, completed
}

// waitList is an intrusive doubly linked FIFO, so a request that leaves
// the queue early is unlinked in O(1) wherever it stands.
type waitList struct {
	head, tail *waiter
	len        int
}

func (l *waitList) pushBack(w *waiter) {
	w.prev, w.next = l.tail, nil
	if l.tail == nil {
		l.head = w
	} else {
		l.tail.next = w
	}
	l.tail = w
	l.len++
}

func (l *waitList) remove(w *waiter) {
	if w.prev == nil {
		l.head = w.next
	} else {
		w.prev.next = w.next
	}
	if w.next == nil {
		l.tail = w.prev
	} else {
		w.next.prev = w.prev
	}
	w.prev, w.next = nil, nil
	l.len--
}

// all returns the waiters in order.
func (l *waitList) all() []*waiter {
	out := make([]*waiter, 0, l.len)
	for w := l.head; w != nil; w = w.next {
		out = append(out, w)
	}
	return out
}
