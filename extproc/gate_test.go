package extproc

import (
	"testing"
	"time"
)

func newWaiter() *waiter { return &waiter{ready: make(chan struct{}, 1)} }

// granted reports whether w has been handed a slot, without blocking.
func granted(w *waiter) bool {
	select {
	case <-w.ready:
		return true
	default:
		return false
	}
}

func TestGateFIFO(t *testing.T) {
	g := newGate(Limits{MaxConcurrent: 2, MaxQueue: 3, QueueTimeout: time.Minute})
	now := time.Now()
	for i := range 2 {
		if !g.tryAcquire() {
			t.Fatalf("request %d should take a slot", i)
		}
	}
	if g.tryAcquire() {
		t.Fatal("a third request took a slot")
	}
	ws := []*waiter{newWaiter(), newWaiter(), newWaiter()}
	for i, w := range ws {
		if res, depth := g.enqueue(w, now); res != enqueued || depth != i+1 {
			t.Fatalf("waiter %d: %v depth %d", i, res, depth)
		}
	}
	if res, depth := g.enqueue(newWaiter(), now); res != full || depth != 3 {
		t.Fatalf("fourth waiter: %v depth %d, want full at 3", res, depth)
	}
	// The middle one leaves; the others keep their order.
	if g.abandon(ws[1]) {
		t.Fatal("abandon reported a grant for a queued waiter")
	}
	g.release()
	if !granted(ws[0]) || granted(ws[2]) {
		t.Fatal("the slot did not go to the oldest waiter")
	}
	g.release()
	if !granted(ws[2]) {
		t.Fatal("the slot did not go to the next waiter")
	}
	// A new request does not overtake: with nobody queued it gets a slot
	// only once one is free.
	if g.tryAcquire() {
		t.Fatal("took a slot while both are held")
	}
	g.release()
	g.release()
	if st := g.stats(); st.InFlight != 0 || st.Queued != 0 || st.Completed != 4 {
		t.Fatalf("stats %+v, want all released and 4 completed", st)
	}
}

// TestGateAbandonAfterGrant: a waiter that gives up just as a slot is
// handed to it owns that slot and must give it back.
func TestGateAbandonAfterGrant(t *testing.T) {
	g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 1, QueueTimeout: time.Minute})
	g.tryAcquire()
	w := newWaiter()
	g.enqueue(w, time.Now())
	g.release() // hands the slot to w
	if !g.abandon(w) {
		t.Fatal("abandon after a grant must report the grant")
	}
	<-w.ready
	g.release()
	if st := g.stats(); st.InFlight != 0 || st.Queued != 0 {
		t.Fatalf("stats %+v, want nothing held", st)
	}
}

func TestGateSetLimits(t *testing.T) {
	g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 4, QueueTimeout: time.Minute})
	g.tryAcquire()
	ws := []*waiter{newWaiter(), newWaiter()}
	for _, w := range ws {
		g.enqueue(w, time.Now())
	}
	g.setLimits(Limits{MaxConcurrent: 3, MaxQueue: 4, QueueTimeout: time.Minute})
	if !granted(ws[0]) || !granted(ws[1]) {
		t.Fatal("raising max_concurrent did not admit the waiters")
	}
	if st := g.stats(); st.InFlight != 3 || st.Queued != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// TestRetryAfter checks that Retry-After follows the observed completion
// rate: the backlog over the rate, rounded up, within [1s, queue timeout].
func TestRetryAfter(t *testing.T) {
	t0 := time.Unix(1000, 0)
	tests := []struct {
		name        string
		completions uint64        // between the two samples
		over        time.Duration // time between the samples
		depth       int
		want        int
	}{
		{"nothing observed yet", 0, 0, 10, 30},
		{"5 per second, 20 waiting", 10, 2 * time.Second, 20, 4},
		{"fast model", 1000, time.Second, 5, 1},
		{"slow model, capped at the queue timeout", 1, 10 * time.Second, 200, 30},
		{"no completions in the window", 0, 5 * time.Second, 3, 30},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := newGate(Limits{MaxConcurrent: 1, MaxQueue: 1, QueueTimeout: 30 * time.Second})
			g.rate.sample(t0, 0)
			if tt.over > 0 {
				g.rate.sample(t0.Add(tt.over), tt.completions)
			}
			if got := g.retryAfter(tt.depth); got != tt.want {
				t.Fatalf("retryAfter(%d) = %d, want %d (rate %v/s)", tt.depth, got, tt.want, g.rate.perSec)
			}
		})
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
