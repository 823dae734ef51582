package sim_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager"
)

// TestLoadProgress: a loading model's phase and percentage, read from
// its server's log as vLLM writes it, show in the View and as progress
// events, in the order of a cold start; a second load says how long it
// is expected to take yet, from the first.
func TestLoadProgress(t *testing.T) {
	tm := startManager(t, baseConfig+"models:\n  a: {vram: 20GiB, sim: {startup_delay: 600ms}}\n")
	c := tm.leaseLater("a")
	poll.Until(t, "a's view to show its phase", func() bool {
		st := tm.status("a")
		return st.State == manager.Loading && st.Phase != "" && !st.Began.IsZero()
	})
	l := <-c
	if l.err != nil {
		t.Fatal(l.err)
	}
	l.Release()
	var phases, details []string
	tm.mu.Lock()
	for _, e := range tm.events {
		if e.Model == "a" && e.Kind == manager.EventProgress {
			details = append(details, e.Detail)
			phase, _, _ := strings.Cut(e.Detail, " ")
			phase = strings.TrimSuffix(phase, ";")
			if len(phases) == 0 || phases[len(phases)-1] != phase {
				phases = append(phases, phase)
			}
		}
	}
	tm.mu.Unlock()
	want := []string{"loading_weights", "compiling", "profiling", "capturing_graphs"}
	if !slices.Equal(phases[:min(len(phases), 4)], want) {
		t.Errorf("progress phases %v, want %v first", phases, want)
	}
	if !slices.Contains(details, "loading_weights 50%") || !slices.Contains(details, "capturing_graphs 100%") {
		t.Errorf("progress events %q: no shard or graph counts", details)
	}
	if st := tm.status("a"); st.Phase != "" || !st.Began.IsZero() {
		t.Errorf("ready, a still shows progress: %+v", st)
	}

	// Loaded once, a's next load is expected to take as long.
	if err := tm.Unload("a"); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "a to stop", func() bool { return tm.status("a").State == manager.Stopped })
	c = tm.leaseLater("a")
	poll.Until(t, "a's view to say how long its load is expected to take", func() bool {
		st := tm.status("a")
		return st.State == manager.Loading && st.Expected > 0
	})
	if l := <-c; l.err != nil {
		t.Fatal(l.err)
	} else {
		l.Release()
	}
	if e := tm.lastEvent(t, "a", manager.EventProgress); !strings.Contains(e.Detail, "left, as its last load took") {
		t.Errorf("a second load's progress: %q", e.Detail)
	}
}

// lastEvent returns the last event of kind for model.
func (tm *testManager) lastEvent(t *testing.T, model, kind string) manager.Event {
	t.Helper()
	tm.mu.Lock()
	defer tm.mu.Unlock()
	for i := len(tm.events) - 1; i >= 0; i-- {
		if e := tm.events[i]; e.Model == model && e.Kind == kind {
			return e
		}
	}
	t.Fatalf("no %s event for %s", kind, model)
	return manager.Event{}
}
