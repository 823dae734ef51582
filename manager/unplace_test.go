package manager

import (
	"testing"
	"time"
)

const unplaceCfg = `
runtime: {kind: sim}
load_timeout: 1m
drain_timeout: 2s
min_resident: 0s
inactivity_timeout: 0s
probe_interval: 0s
sleep: level1
host_memory: 200GiB
gpus:
  - {name: sim0, memory: 90GiB}
  - {name: sim1, memory: 90GiB}
models:
  a: {vram: 40GiB, gpus: [0]}
  b: {vram: 30GiB, gpus: [0]}
  d: {vram: 20GiB, gpus: [1]}
  c: {vram: 90GiB, tensor_parallel_size: 2}
`

// TestUnplacedOperatorLoad: an operator's load without wait (a hold, no
// waiter) of c, placed to put a to sleep; a is woken by a request before
// c could start (GPU 1 busy with d's load); c is unplaced, and placed
// again: its hold lasts until it is ready.
func TestUnplacedOperatorLoad(t *testing.T) {
	r := sleepRig(t, unplaceCfg)
	r.ready("a")
	r.ready("b")
	r.s.models["a"].use.lastUsed.Store(r.now.Add(-time.Hour).UnixNano())
	r.want("d")
	r.flush() // d loading on GPU 1: its claim held
	r.at(func(now time.Time) {
		if err := r.s.load(now, "c", false); err != nil {
			t.Fatal(err)
		}
	})
	c, a := r.s.models["c"], r.s.models["a"]
	if c.state != Loading || a.state != Draining {
		t.Fatalf("c %v, a %v", c.state, a.state)
	}
	r.at(func(now time.Time) { r.s.slept(now, a, 1, a.place.gpus, 1<<30, 39<<30, nil) })
	wa := r.want("a") // a woken: b put to sleep for it
	r.flush()
	b := r.s.models["b"]
	r.at(func(now time.Time) { r.s.slept(now, b, 1, b.place.gpus, 1<<30, 29<<30, nil) })
	t.Logf("a %v, c %v, pending %d", a.state, c.state, len(r.s.pending))
	md, op := r.loading("a")
	r.at(func(now time.Time) { r.s.loaded(now, md, op, time.Second, nil) })
	r.answered(wa).Release()
	dm, dop := r.loading("d")
	r.s.started(dm, dop, r.inst("d", 1))
	r.at(func(now time.Time) { r.s.loaded(now, dm, dop, time.Second, nil) })
	for range 8 {
		r.advance(250 * time.Millisecond)
		r.at(func(now time.Time) { r.s.tick(now) })
	}
	if c.state == Stopped {
		t.Errorf("c, loaded by an operator (no wait), is %v for good after it was unplaced: keepUntil %v, pending %v",
			c.state, c.keepUntil, len(r.s.pending))
	}
}
