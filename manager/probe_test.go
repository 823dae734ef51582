package manager

import (
	"slices"
	"strings"
	"syscall"
	"testing"
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
		if err := ensure(t, tm, m); err != nil {
			t.Fatal(err)
		}
		tm.Release(m)
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
	eventually(t, "a is reported unhealthy", func() bool { _, ok := tm.eventAt("a", EventUnhealthy); return ok })
	e := tm.event(t, "a", EventUnhealthy)
	if !strings.Contains(e.Detail, "2 health probes in a row failed") || !strings.Contains(e.Detail, "no answer to GET /health within 1s") {
		t.Errorf("unhealthy detail %q", e.Detail)
	}
	eventually(t, "a serves from a new server", func() bool {
		st := tm.status("a")
		return st.State == Ready && st.Instance != stopped["a"]
	})
	addr, _ := tm.Endpoint("a")
	if code := get(t, addr, "a"); code != 200 {
		t.Fatalf("the restarted server answered %d", code)
	}
	kinds := tm.eventKinds("a")
	want := []string{EventUnhealthy, EventDraining, EventUnloaded, EventLoadStarted, EventReady}
	if i := slices.Index(kinds, EventUnhealthy); i < 0 || !slices.Equal(kinds[i:], want) {
		t.Errorf("events of a: %v, want %v after its first ready", kinds, want)
	}
	// b is not probed: it stays as it is, stopped or not.
	if st := tm.status("b"); st.State != Ready || st.Instance != stopped["b"] || slices.Contains(tm.eventKinds("b"), EventUnhealthy) {
		t.Errorf("b, which is not probed: %+v, events %v", st, tm.eventKinds("b"))
	}
	syscall.Kill(tm.rt.pid(t, stopped["b"]), syscall.SIGCONT)
}
