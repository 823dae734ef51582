package extproc

import (
	"testing"
	"time"
)

// fifo is the fairness of a gate that has one flow: a FIFO.
var fifo = newFlowTable(Fairness{}, nil)

func newWaiter() *waiter { return &waiter{ready: make(chan struct{}, 1)} }

// signalled reports whether w has been handed a slot (or displaced), without blocking.
func signalled(w *waiter) bool {
	select {
	case <-w.ready:
		return true
	default:
		return false
	}
}

func TestGateFIFO(t *testing.T) {
	g := newGate(Limits{MaxConcurrent: 2, MaxQueue: 3, QueueTimeout: time.Minute}, fifo)
	now := time.Now()
	for i := range 2 {
		if !g.tryAcquire(time.Now(), flowKey{}, 0) {
			t.Fatalf("request %d should take a slot", i)
		}
	}
	if g.tryAcquire(time.Now(), flowKey{}, 0) {
		t.Fatal("a third request took a slot")
	}
	ws := []*waiter{newWaiter(), newWaiter(), newWaiter()}
	for i, w := range ws {
		if res, depth := g.enqueue(w, now, flowKey{}, 0); res != enqueued || depth != i+1 {
			t.Fatalf("waiter %d: %v depth %d", i, res, depth)
		}
	}
	if res, depth := g.enqueue(newWaiter(), now, flowKey{}, 0); res != full || depth != 3 {
		t.Fatalf("fourth waiter: %v depth %d, want full at 3", res, depth)
	}
	// The middle one leaves; the others keep their order.
	if st := g.abandon(ws[1]); st != waiting {
		t.Fatalf("abandon of a queued waiter reported %v", st)
	}
	g.release(0)
	if !signalled(ws[0]) || signalled(ws[2]) {
		t.Fatal("the slot did not go to the oldest waiter")
	}
	g.release(0)
	if !signalled(ws[2]) {
		t.Fatal("the slot did not go to the next waiter")
	}
	// A new request does not overtake: with nobody queued it gets a slot
	// only once one is free.
	if g.tryAcquire(time.Now(), flowKey{}, 0) {
		t.Fatal("took a slot while both are held")
	}
	g.release(0)
	g.release(0)
	if st := g.stats(); st.InFlight != 0 || st.Queued != 0 || st.Completed != 4 {
		t.Fatalf("stats %+v, want all released and 4 completed", st)
	}
}

// TestGateAbandonAfterGrant: a waiter that gives up just as a slot is
// handed to it owns that slot and must give it back.
func TestGateAbandonAfterGrant(t *testing.T) {
	g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 1, QueueTimeout: time.Minute}, fifo)
	g.tryAcquire(time.Now(), flowKey{}, 0)
	w := newWaiter()
	g.enqueue(w, time.Now(), flowKey{}, 0)
	g.release(0) // hands the slot to w
	if g.abandon(w) != granted {
		t.Fatal("abandon after a grant must report the grant")
	}
	<-w.ready
	g.release(0)
	if st := g.stats(); st.InFlight != 0 || st.Queued != 0 {
		t.Fatalf("stats %+v, want nothing held", st)
	}
}

func TestGateSetLimits(t *testing.T) {
	g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 4, QueueTimeout: time.Minute}, fifo)
	g.tryAcquire(time.Now(), flowKey{}, 0)
	ws := []*waiter{newWaiter(), newWaiter()}
	for _, w := range ws {
		g.enqueue(w, time.Now(), flowKey{}, 0)
	}
	g.setLimits(Limits{MaxConcurrent: 3, MaxQueue: 4, QueueTimeout: time.Minute})
	if !signalled(ws[0]) || !signalled(ws[1]) {
		t.Fatal("raising max_concurrent did not admit the waiters")
	}
	if st := g.stats(); st.InFlight != 3 || st.Queued != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// TestRetryAfter: a turned-away request is told its own turn, one queue
// place freeing per request served: before anything is known, from the
// age of the request in flight; then from the service time of those
// served. Turns are spread (within 10%), never under 100 ms nor over
// MaxRetryAfter.
func TestRetryAfter(t *testing.T) {
	t0 := time.Unix(1000, 0)
	within := func(got, want time.Duration) bool {
		return got >= want*9/10-time.Millisecond && got <= want*11/10+time.Millisecond
	}
	tests := []struct {
		name   string
		slots  int
		setup  func(g *gate) time.Time // returns when the requests are turned away
		want   []time.Duration         // what successive turned-away requests are told
		capped bool
	}{
		{name: "nothing known, just started: a second apart", slots: 1,
			setup: func(g *gate) time.Time { g.tryAcquire(t0, flowKey{}, 0); return t0 },
			want:  []time.Duration{time.Second, 2 * time.Second, 3 * time.Second}},
		{name: "nothing known, in flight for 5s: its remaining 5s, then 10s apart", slots: 1,
			setup: func(g *gate) time.Time { g.tryAcquire(t0, flowKey{}, 0); return t0.Add(5 * time.Second) },
			want:  []time.Duration{5 * time.Second, 15 * time.Second, 25 * time.Second}},
		{name: "served 10s each, 2 slots: 5s apart, the first in half a turn", slots: 2,
			setup: func(g *gate) time.Time {
				g.tryAcquire(t0, flowKey{}, 0)
				g.release(10 * time.Second)
				g.tryAcquire(t0, flowKey{}, 0)
				return t0
			},
			want: []time.Duration{2500 * time.Millisecond, 7500 * time.Millisecond, 12500 * time.Millisecond}},
		{name: "a slow model: capped", slots: 1,
			setup: func(g *gate) time.Time {
				g.tryAcquire(t0, flowKey{}, 0)
				g.release(50 * time.Second)
				g.tryAcquire(t0, flowKey{}, 0)
				return t0
			},
			want: []time.Duration{25 * time.Second, MaxRetryAfter, MaxRetryAfter}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := newGate(Limits{MaxConcurrent: tt.slots, MaxQueue: 1, QueueTimeout: 30 * time.Second}, fifo)
			now := tt.setup(g)
			for i, want := range tt.want {
				got := g.retryAfter(now)
				if want == MaxRetryAfter && got != MaxRetryAfter || want != MaxRetryAfter && !within(got, want) {
					t.Fatalf("turned away #%d told %v, want %v", i+1, got, want)
				}
				// The next turn follows the one given, not the spread.
				g.nextTurn = now.Add(want)
			}
		})
	}
	// Turns given long ago do not push new ones back.
	g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 1}, fifo)
	g.tryAcquire(t0, flowKey{}, 0)
	g.release(2 * time.Second)
	g.tryAcquire(t0, flowKey{}, 0)
	g.retryAfter(t0)
	g.retryAfter(t0)
	if got := g.retryAfter(t0.Add(time.Hour)); !within(got, time.Second) {
		t.Errorf("an hour later: told %v, want half a turn (1s)", got)
	}
}

func TestRateEstimateSmooths(t *testing.T) {
	var r rateEstimate
	t0 := time.Unix(1000, 0)
	r.sample(t0, 0)
	r.sample(t0.Add(time.Second), 10) // 10/s
	r.sample(t0.Add(2*time.Second), 10)
	if r.perSec <= 0 || r.perSec >= 10 {
		t.Fatalf("after a quiet second the rate is %v, want between 0 and 10", r.perSec)
	}
	r.sample(t0.Add(2*time.Second+500*time.Millisecond), 1000)
	if r.perSec >= 10 {
		t.Fatalf("a sample inside the window moved the rate to %v", r.perSec)
	}
}
