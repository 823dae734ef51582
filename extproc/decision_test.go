package extproc

import (
	"sync"
	"testing"
	"time"
)

func TestDecisionLog(t *testing.T) {
	l := NewDecisionLog(4)
	llama, qwen := "llama", "qwen"
	t0 := time.Unix(1000, 0)
	for i := range 6 {
		m := &llama
		if i%2 == 1 {
			m = &qwen
		}
		l.record(&decision{at: t0.Add(time.Duration(i) * time.Second), model: m, outcome: OutcomeAdmitted, reason: ReasonSlotFree, depth: i, wait: time.Duration(i) * time.Millisecond})
	}
	l.record(&decision{at: t0.Add(7 * time.Second), model: &qwen, outcome: OutcomeRejected, reason: ReasonQueueFull, status: 429, depth: 12})

	all := l.Recent(Filter{})
	if len(all) != 4 {
		t.Fatalf("kept %d decisions, want the last 4", len(all))
	}
	if d := all[0]; d.Model != "qwen" || d.Outcome != OutcomeRejected || d.Reason != ReasonQueueFull || d.Status != 429 || d.QueueDepth != 12 || !d.Time.Equal(t0.Add(7*time.Second)) {
		t.Fatalf("newest decision %+v", d)
	}
	if d := all[3]; d.QueueDepth != 3 || d.Wait != 3*time.Millisecond {
		t.Fatalf("oldest kept decision %+v, want the fourth recorded", d)
	}
	if got := l.Recent(Filter{Model: "llama"}); len(got) != 1 || got[0].QueueDepth != 4 {
		t.Fatalf("llama decisions %+v", got)
	}
	if got := l.Recent(Filter{Outcome: OutcomeRejected}); len(got) != 1 {
		t.Fatalf("rejections %+v", got)
	}
	if got := l.Recent(Filter{Limit: 2}); len(got) != 2 || got[0].Status != 429 {
		t.Fatalf("limited %+v", got)
	}
}

// TestDecisionLogConcurrent writes from many goroutines while reading; under
// -race this checks that the ring needs no lock, and every record read is
// one that was written whole.
func TestDecisionLogConcurrent(t *testing.T) {
	l := NewDecisionLog(64)
	names := []string{"a", "b", "c"}
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 2000 {
				// depth and wait are tied, so a torn record would show.
				l.record(&decision{at: time.Now(), model: &names[w%3], outcome: OutcomeAdmitted, reason: ReasonSlotFree, status: 200, depth: i, wait: time.Duration(i)})
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	for reading := true; reading; {
		select {
		case <-done:
			reading = false
		default:
		}
		for _, d := range l.Recent(Filter{}) {
			if time.Duration(d.QueueDepth) != d.Wait || d.Status != 200 {
				t.Fatalf("torn record %+v", d)
			}
		}
	}
}

func TestParseOutcome(t *testing.T) {
	for o := OutcomeAdmitted; o <= OutcomeAbandoned; o++ {
		if got, ok := ParseOutcome(o.String()); !ok || got != o {
			t.Errorf("ParseOutcome(%q) = %v, %v", o.String(), got, ok)
		}
	}
	if _, ok := ParseOutcome("nope"); ok {
		t.Error("ParseOutcome accepted nope")
	}
}
