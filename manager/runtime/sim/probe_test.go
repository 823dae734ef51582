package sim_test

import (
	"errors"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/manager/managertest"
)

// TestUnhealthyRestarted: a ready server that stops answering (SIGSTOP:
// up, silent, never exiting, as a deadlocked vLLM) fails its health
// probes; after probe_failures in a row the model is reported unhealthy,
// with why, loses its endpoint, is stopped and started again, and serves.
// It stayed ready, with its endpoint, for ever.
func TestUnhealthyRestarted(t *testing.T) {
	// A healthy server answers a probe well within a second, on the
	// slowest machine: only the stopped one fails.
	tm := startManager(t, baseConfig+"probe_interval: 1s\nprobe_timeout: 1s\nprobe_failures: 2\nmodels:\n  a: {vram: 20GiB}\n  b: {vram: 20GiB, probe_interval: 0s}\n")
	for _, m := range []string{"a", "b"} {
		if err := tm.ensure(m); err != nil {
			t.Fatal(err)
		}
	}
	stopped := map[string]string{}
	for _, m := range []string{"a", "b"} {
		st := tm.status(m)
		stopped[m] = st.Instance
		pid := tm.rt.pid(t, st.Instance)
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
	}
	poll.Until(t, "a is reported unhealthy", func() bool { _, ok := tm.eventAt("a", manager.EventUnhealthy); return ok })
	e := tm.event(t, "a", manager.EventUnhealthy)
	if !strings.Contains(e.Detail, "2 health probes in a row failed") || !strings.Contains(e.Detail, "no answer to GET /health within 1s") {
		t.Errorf("unhealthy detail %q", e.Detail)
	}
	poll.Until(t, "a serves from a new server", func() bool {
		st := tm.status("a")
		return st.State == manager.Ready && st.Instance != stopped["a"]
	})
	if code := managertest.Chat(tm.status("a").Endpoint, "a"); code != 200 {
		t.Fatalf("the restarted server answered %d", code)
	}
	// The View shows a ready model before its ready event is told.
	poll.Until(t, "a's second ready event is told", func() bool {
		kinds := tm.eventKinds("a")
		i := slices.Index(kinds, manager.EventUnhealthy)
		return i >= 0 && slices.Contains(kinds[i:], manager.EventReady)
	})
	kinds := tm.eventKinds("a")
	want := []string{manager.EventUnhealthy, manager.EventDraining, manager.EventUnloaded, manager.EventLoadStarted, manager.EventReady}
	if i := slices.Index(kinds, manager.EventUnhealthy); i < 0 || !slices.Equal(kinds[i:], want) {
		t.Errorf("events of a: %v, want %v after its first ready", kinds, want)
	}
	// b is not probed: it stays as it is, stopped or not.
	if st := tm.status("b"); st.State != manager.Ready || st.Instance != stopped["b"] || slices.Contains(tm.eventKinds("b"), manager.EventUnhealthy) {
		t.Errorf("b, which is not probed: %+v, events %v", st, tm.eventKinds("b"))
	}
	syscall.Kill(tm.rt.pid(t, stopped["b"]), syscall.SIGCONT)
}

// stopServer SIGSTOPs model's server, and lets it go on when the test ends.
func stopServer(t *testing.T, tm *testManager, model string) string {
	t.Helper()
	inst := tm.status(model).Instance
	pid := tm.rt.pid(t, inst)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGCONT) })
	return inst
}

const probed = baseConfig + "probe_interval: 1s\nprobe_timeout: 1s\nprobe_failures: 2\n"

// TestUnloadWinsOverUnhealthyRestart: an operator who unloads a model
// while it drains for failing its probes has it stopped, not restarted.
// The unload was taken (OK) and the model came back anyway.
func TestUnloadWinsOverUnhealthyRestart(t *testing.T) {
	tm := startManager(t, strings.Replace(probed, "drain_timeout: 2s", "drain_timeout: 1m", 1)+"models:\n  a: {vram: 20GiB}\n")
	l, err := tm.lease("a") // held in flight: the drain waits
	if err != nil {
		t.Fatal(err)
	}
	stopServer(t, tm, "a")
	poll.Until(t, "a is unhealthy and draining", func() bool {
		_, ok := tm.eventAt("a", manager.EventUnhealthy)
		return ok && tm.status("a").State == manager.Draining
	})
	if err := tm.Unload("a"); err != nil {
		t.Fatal(err)
	}
	l.Release()
	poll.Until(t, "a is stopped", func() bool { return tm.status("a").State == manager.Stopped })
	starts := tm.rt.count("a")
	// A restart would come at once (ticks of 20 ms); none comes.
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if tm.rt.count("a") != starts || tm.status("a").State != manager.Stopped {
			t.Fatalf("a restarted after the operator unloaded it: events %v", tm.eventKinds("a"))
		}
	}
}

// TestUnhealthyAgainBacksOff: a model whose restarted server hangs again
// before it has passed a probe is not restarted at once a second time,
// but after a backoff, as a failed load would be: it was restarted in a
// loop for as poll.Long as it kept hanging.
func TestUnhealthyAgainBacksOff(t *testing.T) {
	tm := startManagerOpts(t, probed+"models:\n  a: {vram: 20GiB}\n", manager.Options{Backoff: time.Hour})
	if err := tm.ensure("a"); err != nil {
		t.Fatal(err)
	}
	first := stopServer(t, tm, "a")
	poll.Until(t, "a serves from a second server", func() bool {
		st := tm.status("a")
		return st.State == manager.Ready && st.Instance != first
	})
	stopServer(t, tm, "a") // before any probe of it has passed
	poll.Until(t, "a is unhealthy again, and stopped", func() bool {
		n := 0
		for _, k := range tm.eventKinds("a") {
			if k == manager.EventUnhealthy {
				n++
			}
		}
		return n == 2 && tm.status("a").State == manager.Stopped
	})
	st := tm.status("a")
	if !st.RetryAt.After(time.Now().Add(manager.BackoffMax - time.Minute)) { // the hour is capped at BackoffMax
		t.Fatalf("a is tried again at %v, want after the backoff", st.RetryAt)
	}
	if n := tm.rt.count("a"); n != 2 {
		t.Fatalf("%d starts, want 2: no third before the backoff", n)
	}
}

// TestLoadAsStrictAsProbes: a server whose /health answers slower than
// probe_timeout is not ready: the load checks it as its probes would. It
// was ready by the load's 2 s check, then unhealthy by its probes, and
// restarted in a loop.
func TestLoadAsStrictAsProbes(t *testing.T) {
	tm := startManager(t, strings.Replace(probed, "load_timeout: 1m", "load_timeout: 3s", 1)+"models:\n  a: {vram: 20GiB, sim: {slow_health: 1500ms}}\n")
	err := tm.ensure("a")
	if !errors.Is(err, manager.ErrLoadTimeout) {
		t.Fatalf("a server slower than probe_timeout: %v, want not healthy within load_timeout", err)
	}
	if slices.Contains(tm.eventKinds("a"), manager.EventReady) {
		t.Fatal("a was ready")
	}
}
