package extproc

import (
	"math"
	"math/rand/v2"
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
	admitted admitResult = iota // the slot is the caller's
	enqueued                    // the caller waits on its waiter
	full                        // no slot and no room to wait: 429
)

// A gate is one model's admission state: a counting semaphore in front of a
// bounded FIFO of waiters. Every operation is O(1) under a mutex that guards
// counters and list links only; nothing logs, allocates or blocks while
// holding it, so admission costs the same with 10,000 waiters as with none.
type gate struct {
	mu        sync.Mutex
	limits    Limits
	inflight  int
	queue     waitList
	completed uint64 // requests released so far, for the rate estimate
	rate      rateEstimate
	// For Retry-After (retryAfter): since when a slot has been taken
	// without a break (inflight above 0), the model's service time (an
	// average of the requests it served; 0 while none has been), and the
	// latest time a turned-away request was told to come back at.
	busySince time.Time
	served    time.Duration
	nextTurn  time.Time
	// queued mirrors queue.len for readers that must not take mu, such as
	// the queue-depth header on every response. Written under mu.
	queued atomic.Int64
}

// A waiter is one request queued at a gate. Waiters are pooled: a queued
// request is the slow path, but under overload every request takes it.
type waiter struct {
	prev, next *waiter
	queued     bool          // in the gate's list; guarded by gate.mu
	ready      chan struct{} // receives once when a slot is handed over
}

var waiterPool = sync.Pool{New: func() any { return &waiter{ready: make(chan struct{}, 1)} }}

func newGate(l Limits) *gate { return &gate{limits: l} }

// tryAcquire takes a slot when one is free and nobody is waiting: FIFO, so
// a new request never overtakes a queued one. It is the whole admission cost
// of an unloaded model.
func (g *gate) tryAcquire(now time.Time) bool {
	g.mu.Lock()
	ok := g.inflight < g.limits.MaxConcurrent && g.queue.len == 0
	if ok {
		g.takeLocked(now)
	}
	g.mu.Unlock()
	return ok
}

// takeLocked takes a slot.
func (g *gate) takeLocked(now time.Time) {
	if g.inflight == 0 {
		g.busySince = now
	}
	g.inflight++
}

// enqueue is tryAcquire's slow path: it takes a slot if one has come free
// since, else queues w when there is room. It samples the completion rate
// for Retry-After. depth is the queue length after the call.
func (g *gate) enqueue(w *waiter, now time.Time) (res admitResult, depth int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.inflight < g.limits.MaxConcurrent && g.queue.len == 0 {
		g.takeLocked(now)
		return admitted, 0
	}
	g.rate.sample(now, g.completed)
	if g.queue.len >= g.limits.MaxQueue {
		return full, g.queue.len
	}
	g.queue.pushBack(w)
	g.queued.Store(int64(g.queue.len))
	return enqueued, g.queue.len
}

// depth is the number of requests waiting, read without the lock.
func (g *gate) depth() int { return int(g.queued.Load()) }

// release gives a slot back, handing it straight to the oldest waiter if
// there is one. Each slot taken must be released exactly once. served is
// how long the model took to serve the request, 0 when it did not serve
// it (the request gave up, or no answer began).
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

// grantLocked hands free slots to waiters in FIFO order.
func (g *gate) grantLocked() {
	for g.inflight < g.limits.MaxConcurrent && g.queue.len > 0 {
		w := g.queue.popFront()
		g.queued.Store(int64(g.queue.len))
		g.inflight++
		w.ready <- struct{}{} // never blocks: capacity 1, one grant per queuing
	}
}

// abandon takes w out of the queue because its request gave up (timeout,
// client gone). It reports whether a slot had already been handed to w, in
// which case the caller owns that slot and must release it, and must drain
// w.ready before reusing w.
func (g *gate) abandon(w *waiter) (granted bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if w.queued {
		g.queue.remove(w)
		g.queued.Store(int64(g.queue.len))
		return false
	}
	return true
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

// GateStats is a snapshot of one model's admission state.
type GateStats struct {
	Limits    Limits
	InFlight  int
	Queued    int
	Completed uint64
	// Rate is the observed completion rate in requests per second, or 0
	// when nothing has been observed yet.
	Rate float64
}

func (g *gate) stats() GateStats {
	g.mu.Lock()
	defer g.mu.Unlock()
	return GateStats{Limits: g.limits, InFlight: g.inflight, Queued: g.queue.len, Completed: g.completed, Rate: g.rate.perSec}
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
	service, first := g.served, time.Duration(0)
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
	turn := service / slots
	at := now.Add(first)
	if next := g.nextTurn.Add(turn); next.After(at) {
		at = next
	}
	g.nextTurn = at
	d := at.Sub(now)
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
	w.queued = true
	l.len++
}

func (l *waitList) popFront() *waiter {
	w := l.head
	l.remove(w)
	return w
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
	w.prev, w.next, w.queued = nil, nil, false
	l.len--
}
