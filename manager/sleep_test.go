package manager

import (
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/manager/runtime"
)

// The sleep tier's decisions, table-tested as the rest of the scheduler's
// (scheduler_test.go); the tier runs whole on the sim runtime in
// runtime/sim/sleep_test.go.

const sleepSchedConfig = schedConfig + "sleep: level1\nhost_memory: 200GiB\n"

// sleepRig is a rig whose runtime can put servers to sleep.
func sleepRig(t *testing.T, yaml string) *rig {
	r := newRig(t, yaml)
	r.s.canSleep = true
	return r
}

// sleepNow puts a ready model to sleep as an operator asks, and has it
// fall asleep keeping 1 GiB of its GPU and host GiB of host memory.
func (r *rig) sleepNow(name string, host uint64) {
	r.t.Helper()
	r.at(func(now time.Time) {
		if err := r.s.sleepAsked(now, name); err != nil {
			r.t.Fatal(err)
		}
	})
	md := r.s.models[name]
	r.at(func(now time.Time) { r.s.slept(now, md, 1, md.place.gpus, 1<<30, host<<30, nil) })
	if md.state != Sleeping {
		r.t.Fatalf("%s is %v", name, md.state)
	}
}

// TestSleepDecisions: a ready model put down for another sleeps once it
// has drained, on its GPUs' turn; the other starts once it sleeps; a
// request for the sleeper wakes it, and the wake ends as a load does.
func TestSleepDecisions(t *testing.T) {
	r := sleepRig(t, sleepSchedConfig+"models:\n  a: {vram: 60GiB}\n  b: {vram: 60GiB}\n")
	r.ready("a")
	wb := r.want("b")
	r.expect("b needs a's room", func(time.Time) {}, "draining a", "sleep a at level 1")
	a := r.s.models["a"]
	r.expect("a sleeps; b starts", func(now time.Time) { r.s.slept(now, a, 1, a.place.gpus, 1<<30, 59<<30, nil) },
		"save a asleep at level 1: 1.0GiB of each GPU, 59.0GiB of host memory", "sleeping a", "reread GPUs", "load_started b", "start b on [0]")
	if mv := r.view("a"); mv.State != Sleeping || mv.SleepLevel != 1 || mv.Endpoint != "" || mv.HostMemory != 59<<30 {
		t.Fatalf("a asleep: %+v", mv)
	}
	r.start("b")
	r.answered(wb).Release()
	wa := r.want("a")
	r.expect("a needs b's room: b sleeps, then a wakes", func(time.Time) {}, "draining b", "sleep b at level 1")
	b := r.s.models["b"]
	r.expect("b sleeps; a wakes", func(now time.Time) { r.s.slept(now, b, 1, b.place.gpus, 1<<30, 59<<30, nil) },
		"save b asleep at level 1: 1.0GiB of each GPU, 59.0GiB of host memory", "sleeping b", "reread GPUs", "waking a", "wake a from level 1")
	if mv := r.view("a"); mv.State != Waking {
		t.Fatalf("a: %v", mv.State)
	}
	md, op := r.loading("a")
	r.expect("a woken", func(now time.Time) { r.s.loaded(now, md, op, time.Second, nil) }, "woken a", "reread GPUs")
	if l := r.answered(wa); l.Endpoint() == "" {
		t.Fatal("woken a leased without an endpoint")
	} else {
		l.Release()
	}
	if mv := r.view("a"); mv.State != Ready || mv.SleepLevel != 0 || mv.HostMemory != 0 {
		t.Fatalf("a awake: %+v", mv)
	}
}

// TestSleepFailsStops: a server that does not fall asleep is stopped, and
// so is one whose model was unloaded as it fell asleep.
func TestSleepFailsStops(t *testing.T) {
	for _, tt := range []struct {
		name   string
		unload bool
		err    error
	}{
		{"sleep failed", false, errors.New("POST /sleep answered 500")},
		{"unloaded as it fell asleep", true, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := sleepRig(t, sleepSchedConfig+"models:\n  a: {vram: 60GiB}\n")
			r.ready("a")
			r.at(func(now time.Time) { r.s.sleepAsked(now, "a") })
			if tt.unload {
				r.expect("unload as it falls asleep", func(now time.Time) { r.s.unloadAsked(now, "a") })
			}
			a := r.s.models["a"]
			r.expect("the sleep ends", func(now time.Time) { r.s.slept(now, a, 1, a.place.gpus, 1<<30, 59<<30, tt.err) },
				"stop a within 2s")
			r.expect("stopped", func(now time.Time) { r.s.stopped(now, a, a.place.gpus, nil) }, "reread GPUs", "unloaded a")
		})
	}
}

// TestMaxModelsWhileWaking: a waking model counts against max_models.
func TestMaxModelsWhileWaking(t *testing.T) {
	r := sleepRig(t, sleepSchedConfig+"max_models: 1\nmodels:\n  a: {vram: 20GiB}\n  c: {vram: 20GiB}\n")
	r.ready("a")
	r.sleepNow("a", 19)
	r.want("a")
	r.flush()
	if md := r.s.models["a"]; md.state != Waking || md.loading == nil {
		t.Fatalf("a is %v", md.state)
	}
	r.at(func(time.Time) { r.want("c") })
	if st := r.s.models["c"].state; st != Stopped {
		t.Errorf("max_models 1: c is %v while a wakes", st)
	}
}

// TestOverHostHandover: a sleeper being stopped to make host memory for
// another model's sleep does not count as held, or every tick of the
// handover would stop one more sleeper.
func TestOverHostHandover(t *testing.T) {
	r := sleepRig(t, schedConfig+"sleep: level1\nhost_memory: 60GiB\nmodels:\n  s1: {vram: 10GiB}\n  a: {vram: 10GiB}\n  s2: {vram: 10GiB}\n  s3: {vram: 10GiB}\n  s4: {vram: 10GiB}\n")
	for _, m := range []string{"s1", "a", "s2", "s3", "s4"} {
		r.ready(m)
	}
	r.sleepNow("s1", 30)
	for _, m := range []string{"s2", "s3", "s4"} {
		r.sleepNow(m, 5)
	}
	for i, m := range []string{"s1", "a", "s2", "s3", "s4"} {
		r.s.models[m].use.lastUsed.Store(r.now.Add(time.Duration(i-10) * time.Hour).UnixNano())
	}
	r.s.models["a"].seen.host[1], r.s.models["a"].seen.hostSeen[1] = 20<<30, true
	r.expect("a's sleep needs s1's host memory", func(now time.Time) {
		if err := r.s.sleepAsked(now, "a"); err != nil {
			t.Fatal(err)
		}
	}, "draining s1", "stop s1 within 2s", "draining a")
	for range 3 {
		r.advance(250 * time.Millisecond)
		r.expect("a tick during the handover", func(now time.Time) { r.s.tick(now) })
	}
}

// TestAdoptedAsleep: a server a previous vgw put to sleep is adopted
// asleep, foreseen to hold what its configured level holds; a level-2
// sleeper with no host memory to spare stays.
func TestAdoptedAsleep(t *testing.T) {
	r := sleepRig(t, schedConfig+"sleep: level2\nhost_memory: 0\nmodels:\n  a: {vram: 20GiB}\n")
	md := r.s.models["a"]
	inst := r.inst("a", 0)
	r.at(func(time.Time) { r.s.adopted([]*runtime.Instance{inst}) })
	op := md.loading
	r.expect("adopted asleep", func(now time.Time) { r.s.adoptedAsleep(now, md, op) }, "sleeping a", "list a")
	r.advance(250 * time.Millisecond)
	r.expect("a tick", func(now time.Time) { r.s.tick(now) })
	if md.state != Sleeping || md.sleep.host != 0 {
		t.Errorf("a is %v holding %d", md.state, md.sleep.host)
	}
}

// TestRemovedWhileWaking: a model removed from the config as it wakes
// stops waking.
func TestRemovedWhileWaking(t *testing.T) {
	r := sleepRig(t, sleepSchedConfig+"models:\n  a: {vram: 20GiB}\n  b: {vram: 20GiB}\n")
	r.ready("a")
	r.sleepNow("a", 19)
	w := r.want("a")
	r.flush()
	cfg := *r.s.cfg
	cfg.Models = map[string]*config.Model{"b": r.s.cfg.Models["b"]}
	r.expect("a leaves the config", func(now time.Time) { r.s.configure(now, &cfg) }, "cancel a load")
	if err := r.failed(w); !errors.Is(err, ErrUnknownModel) {
		t.Errorf("a's waiter: %v", err)
	}
}

// TestExitWhileWaitingToWake: a sleeper whose server dies while its wake
// waits for room is started cold in its place.
func TestExitWhileWaitingToWake(t *testing.T) {
	r := sleepRig(t, sleepSchedConfig+"models:\n  a: {vram: 60GiB}\n  b: {vram: 60GiB}\n")
	r.ready("a")
	r.sleepNow("a", 59)
	r.ready("b")
	var w *waiter
	r.expect("b is put down for a", func(time.Time) { w = r.want("a") }, "draining b", "sleep b at level 1")
	a := r.s.models["a"]
	if a.state != Waking || a.loading != nil {
		t.Fatalf("a is %v", a.state)
	}
	r.at(func(now time.Time) { r.s.exited(now, runtime.Exit{ID: a.inst.ID, Model: "a", Reason: "killed"}) })
	if a.state != Loading || a.inst != nil || a.asleep() {
		t.Fatalf("a is %v, inst %v, asleep %v", a.state, a.inst, a.asleep())
	}
	b := r.s.models["b"]
	got := r.at(func(now time.Time) { r.s.slept(now, b, 1, b.place.gpus, 1<<30, 59<<30, nil) })
	if !slices.Contains(got, "start a on [0]") {
		t.Fatalf("b asleep: %q", got)
	}
	r.start("a")
	r.answered(w).Release()
}

// TestFailedState: a model stopped after a failed load shows as failed.
func TestFailedState(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n")
	w := r.want("a")
	r.flush()
	md, op := r.loading("a")
	r.at(func(now time.Time) { r.s.loadFailed(now, md, op, errors.New("boom")) })
	r.failed(w)
	if mv := r.view("a"); mv.State != Failed || mv.State.String() != "failed" {
		t.Fatalf("a after a failed load: %v", mv.State)
	}
}

// TestSleepFiguresKept: what a sleep measured is kept with the model's
// footprints, so that a restarted vgw counts a sleeper, adopted or new,
// at what it held, not at the most it might; what was measured under
// other settings is not used.
func TestSleepFiguresKept(t *testing.T) {
	r := sleepRig(t, sleepSchedConfig+"models:\n  a: {vram: 20GiB}\n")
	md := r.s.models["a"]
	r.fps["a"] = Footprint{Signature: md.sig, Residual: 2 << 30, HostLevel1: 12 << 30}
	inst := r.inst("a", 0)
	r.at(func(time.Time) { r.s.adopted([]*runtime.Instance{inst}) })
	op := md.loading
	r.at(func(now time.Time) { r.s.adoptedAsleep(now, md, op) })
	if md.sleep.residual != 2<<30 || md.sleep.host != 12<<30 {
		t.Fatalf("adopted asleep, counted at %d of each GPU and %d of host memory", md.sleep.residual, md.sleep.host)
	}
	if perGPU, source := r.s.footprint(md); source != "declared" || perGPU != 20<<30 {
		t.Fatalf("footprint %d %s", perGPU, source)
	}
	r.fps["a"] = Footprint{Signature: "other", Residual: 2 << 30, HostLevel1: 12 << 30}
	if _, host := r.s.foreseen(md, 1); host != 20<<30 {
		t.Fatalf("figures of other settings used: host %d", host)
	}
}
