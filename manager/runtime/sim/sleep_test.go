package sim_test

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"syscall"
	"testing"

	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/manager/managertest"
)

// sleepSetup is the gateway's settings of a sleep test.
type sleepSetup struct {
	sleep, hostMemory, loadTimeout string
	twoGPUs                        bool
}

// config is a sim config of one 90 GiB GPU (two with twoGPUs) with s's
// settings (by default level 1, 80 GiB of host memory, a load timeout of
// a minute).
func (s sleepSetup) config() string {
	second := ""
	if s.twoGPUs {
		second = "  - {name: sim1, memory: 90GiB}\n"
	}
	return `
runtime: {kind: sim}
load_timeout: ` + cmp.Or(s.loadTimeout, "1m") + `
drain_timeout: 2s
min_resident: 0s
inactivity_timeout: 0s
sleep: ` + cmp.Or(s.sleep, "level1") + `
host_memory: ` + cmp.Or(s.hostMemory, "80GiB") + `
gpus:
  - {name: sim0, memory: 90GiB}
` + second
}

// sleepyModel is a sim model of vram that sleeps in 10 ms, wakes in
// 20 ms and keeps 1 GiB of its GPU asleep.
func sleepyModel(name, vram string) string {
	return "  " + name + ": {vram: " + vram + ", sim: {sleep_delay: 10ms, wake_delay: 20ms, residual_vram: 1GiB}}\n"
}

// used is what the sim GPUs are charged in all.
func (tm *testManager) used(t *testing.T) uint64 {
	t.Helper()
	mem, err := tm.gpus.Memory()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, m := range mem {
		n += m.Used
	}
	return n
}

// TestSleepTier: a model put down for another sleeps in its server,
// keeping its residual and its weights in host memory, and a request
// wakes it without a new start; placement stops the least recently used
// sleeper to make room, and the ledger matches what the fakes are
// charged.
func TestSleepTier(t *testing.T) {
	tm := startManager(t, sleepSetup{}.config()+"models:\n"+sleepyModel("a", "40GiB")+sleepyModel("b", "40GiB")+sleepyModel("c", "45GiB")+sleepyModel("d", "40GiB"))
	for _, m := range []string{"a", "b"} {
		if err := tm.ensure(m); err != nil {
			t.Fatal(err)
		}
	}
	// c needs a's room: a, the least recently used, sleeps.
	if err := tm.ensure("c"); err != nil {
		t.Fatal(err)
	}
	st := tm.status("a")
	if st.State != manager.Sleeping || st.SleepLevel != 1 || st.Residual != 1<<30 || st.HostMemory != 39<<30 || st.Endpoint != "" {
		t.Fatalf("a: %+v, want asleep at level 1 keeping 1 GiB of its GPU and 39 GiB of host memory; events %v", st, tm.allEvents())
	}
	poll.Until(t, "the GPUs charged b, c and a's residual", func() bool { return tm.used(t) == 86<<30 })
	if v := tm.View(); v.HostUsed != 39<<30 || v.HostBudget != 80<<30 || tm.rt.Host() != 39<<30 {
		t.Errorf("host memory %d of %d in the view, %d charged", v.HostUsed>>30, v.HostBudget>>30, tm.rt.Host()>>30)
	}
	// a is woken, not started again: b, now the least recently used,
	// sleeps in its place; for a while both hold host memory.
	l, err := tm.lease("a")
	if err != nil {
		t.Fatal(err)
	}
	if code := managertest.Chat(l.Endpoint(), "a"); code != 200 {
		t.Errorf("woken a answers %d", code)
	}
	l.Release()
	if n := tm.rt.count("a"); n != 1 {
		t.Errorf("a started %d times, want once", n)
	}
	if kinds := tm.eventKinds("a"); !slices.Equal(kinds[len(kinds)-3:], []string{manager.EventSleeping, manager.EventWaking, manager.EventWoken}) {
		t.Errorf("a's events %v", kinds)
	}
	if woken := tm.event(t, "a", manager.EventWoken); woken.Took <= 0 {
		t.Errorf("woken event %+v has no duration", woken)
	}
	if st := tm.status("b"); st.State != manager.Sleeping {
		t.Fatalf("b is %v, want sleeping", st.State)
	}
	// d needs room too: b, asleep and the least recently used, stops,
	// for c to sleep in the host memory it gave back.
	if err := tm.ensure("d"); err != nil {
		t.Fatal(err)
	}
	if st := tm.status("b"); st.State != manager.Stopped {
		t.Errorf("b is %v, want stopped to make room", st.State)
	}
	if st := tm.status("c"); st.State != manager.Sleeping {
		t.Errorf("c is %v, want sleeping", st.State)
	}
	poll.Until(t, "the GPUs charged a, d and c's residual", func() bool { return tm.used(t) == 81<<30 })
	if v := tm.View(); v.HostUsed != tm.rt.Host() || v.HostUsed > v.HostBudget {
		t.Errorf("host memory %d in the view, %d charged, budget %d", v.HostUsed>>30, tm.rt.Host()>>30, v.HostBudget>>30)
	}
}

// TestSleepNeverInFlight: a model with a request in flight is never put
// down; once it ends, the model sleeps, and its fake (which dies when
// put to sleep with a request in flight) lives on.
func TestSleepNeverInFlight(t *testing.T) {
	tm := startManager(t, sleepSetup{hostMemory: "100GiB"}.config()+"models:\n"+sleepyModel("a", "60GiB")+sleepyModel("b", "60GiB"))
	l, err := tm.lease("a")
	if err != nil {
		t.Fatal(err)
	}
	b := tm.leaseLater("b")
	poll.Until(t, "b to wait for room", func() bool { return tm.status("b").Waiting == 1 })
	if st := tm.status("a"); st.State != manager.Ready {
		t.Fatalf("a is %v with a request in flight", st.State)
	}
	l.Release()
	got := <-b
	if got.err != nil {
		t.Fatal(got.err)
	}
	got.Release()
	if st := tm.status("a"); st.State != manager.Sleeping {
		t.Fatalf("a is %v, want sleeping", st.State)
	}
	if slices.Contains(tm.eventKinds("a"), manager.EventCrashed) {
		t.Fatalf("a crashed: %v", tm.allEvents())
	}
}

// TestSleepLevel2: a level-2 sleeper holds no host memory, and wakes
// through vLLM's level-2 sequence (a fake woken otherwise serves
// nonsense, which the chat below would not mind, but it would still be
// asleep to /is_sleeping, which the wake checks).
func TestSleepLevel2(t *testing.T) {
	tm := startManager(t, sleepSetup{hostMemory: "0", sleep: "level2"}.config()+"models:\n"+sleepyModel("a", "60GiB")+sleepyModel("b", "60GiB"))
	for _, m := range []string{"a", "b", "a"} {
		if err := tm.ensure(m); err != nil {
			t.Fatal(err)
		}
	}
	if st := tm.status("b"); st.State != manager.Sleeping || st.SleepLevel != 2 || st.HostMemory != 0 {
		t.Fatalf("b: %+v, want asleep at level 2 with no host memory", st)
	}
	if n := tm.rt.count("a"); n != 1 {
		t.Errorf("a started %d times, want once", n)
	}
}

// TestSleepOff: with sleep off a model put down is stopped, as before.
func TestSleepOff(t *testing.T) {
	tm := startManager(t, sleepSetup{sleep: "off"}.config()+"models:\n"+sleepyModel("a", "60GiB")+sleepyModel("b", "60GiB"))
	for _, m := range []string{"a", "b"} {
		if err := tm.ensure(m); err != nil {
			t.Fatal(err)
		}
	}
	if st := tm.status("a"); st.State != manager.Stopped {
		t.Fatalf("a is %v, want stopped", st.State)
	}
}

// startSleeper runs a manager with setup and two models that each take
// most of the GPU, loads a and then b, which puts a to sleep, and returns
// the process of a's fake.
func startSleeper(t *testing.T, setup sleepSetup) (*testManager, int) {
	t.Helper()
	tm := startManager(t, setup.config()+"models:\n"+sleepyModel("a", "60GiB")+sleepyModel("b", "60GiB"))
	for _, m := range []string{"a", "b"} {
		if err := tm.ensure(m); err != nil {
			t.Fatal(err)
		}
	}
	st := tm.status("a")
	if st.State != manager.Sleeping {
		t.Fatalf("a is %v", st.State)
	}
	return tm, tm.rt.pid(t, st.Instance)
}

// TestSleeperCrash: a sleeper whose server dies is stopped, its host
// memory given back, and the next request starts it cold.
func TestSleeperCrash(t *testing.T) {
	tm, a := startSleeper(t, sleepSetup{hostMemory: "100GiB"})
	syscall.Kill(a, syscall.SIGKILL)
	poll.Until(t, "a to be stopped", func() bool { return tm.status("a").State == manager.Stopped })
	if v := tm.View(); v.HostUsed != 0 || tm.rt.Host() != 0 {
		t.Errorf("host memory %d in the view, %d charged, after the sleeper died", v.HostUsed, tm.rt.Host())
	}
	if err := tm.ensure("a"); err != nil {
		t.Fatal(err)
	}
	if n := tm.rt.count("a"); n != 2 {
		t.Errorf("a started %d times, want twice", n)
	}
}

// TestWakeFails: a sleeper that does not wake (its fake stopped with
// SIGSTOP) is stopped at load_timeout and started again cold for the
// request that waits.
func TestWakeFails(t *testing.T) {
	tm, a := startSleeper(t, sleepSetup{hostMemory: "100GiB", loadTimeout: "1s"})
	syscall.Kill(a, syscall.SIGSTOP)
	if err := tm.ensure("a"); err != nil {
		t.Fatal(err)
	}
	if n := tm.rt.count("a"); n != 2 {
		t.Errorf("a started %d times, want twice", n)
	}
	if !slices.Contains(tm.eventKinds("a"), manager.EventWakeFailed) {
		t.Errorf("no wake_failed event: %v", tm.eventKinds("a"))
	}
}

// TestSleepWakeAsked: an operator puts a ready model to sleep and wakes
// it; each says why when it cannot.
func TestSleepWakeAsked(t *testing.T) {
	tm := startManager(t, sleepSetup{}.config()+"models:\n"+sleepyModel("a", "20GiB")+"  off: {vram: 20GiB, sleep: off}\n")
	if err := tm.Sleep(context.Background(), "a", false); !errors.Is(err, manager.ErrCannotSleep) {
		t.Errorf("sleep of a stopped model: %v", err)
	}
	if err := tm.Wake(context.Background(), "a", false); !errors.Is(err, manager.ErrNotAsleep) {
		t.Errorf("wake of a stopped model: %v", err)
	}
	for _, m := range []string{"a", "off"} {
		if err := tm.ensure(m); err != nil {
			t.Fatal(err)
		}
	}
	if err := tm.Sleep(context.Background(), "off", false); !errors.Is(err, manager.ErrCannotSleep) {
		t.Errorf("sleep of a model with sleep off: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), poll.Long)
	defer cancel()
	if err := tm.Sleep(ctx, "a", true); err != nil {
		t.Fatal(err)
	}
	if st := tm.status("a"); st.State != manager.Sleeping {
		t.Fatalf("a is %v once its sleep returned", st.State)
	}
	if err := tm.Wake(ctx, "a", true); err != nil {
		t.Fatal(err)
	}
	if st := tm.status("a"); st.State != manager.Ready || tm.rt.count("a") != 1 {
		t.Fatalf("a is %v after %d starts", st.State, tm.rt.count("a"))
	}
}
