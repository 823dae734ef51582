package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"go.uber.org/goleak"

	"github.com/vgw-project/vgw/admin/admintest"
	"github.com/vgw-project/vgw/envoy/envoytest"
	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/extproc/extproctest"
)

// soak runs the load tests at the scale RELIABILITY.md reports (make
// soak); without it they run reduced, fast enough for CI under -race.
var soak = flag.Bool("soak", false, "run the load tests at full scale (make soak)")

// waveFlag overrides how many requests arrive at once, unplaced, to find
// what a burst the machine takes (RELIABILITY.md).
var waveFlag = flag.Int("wave", 0, "requests arriving at once in the load tests (0: the default)")

// scale picks the CI or the soak figure.
func scale(ci, full int) int {
	if *soak {
		return full
	}
	return ci
}

// settled waits until every count vgw keeps of requests is back to zero:
// admission's (in flight, queued), the manager's (in flight, waiting for a
// load) and the gauges /metrics shows.
func (s *stack) settled(t testing.TB, within time.Duration) {
	t.Helper()
	metrics := "http://" + s.app.httpAddr.String() + "/metrics"
	var why string
	deadline := time.Now().Add(within)
	for {
		why = s.unsettled(metrics)
		if why == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("counts not back to zero after %v: %s", within, why)
		}
		time.Sleep(5 * time.Millisecond) // polling interval
	}
}

func (s *stack) unsettled(metrics string) string {
	for name, st := range s.app.ep.AllStats() {
		if st.InFlight != 0 || st.Queued != 0 {
			return fmt.Sprintf("admission for %s: %d in flight, %d queued", name, st.InFlight, st.Queued)
		}
	}
	for _, m := range s.mgr.View().Models {
		if m.InFlight() != 0 || m.Waiting != 0 {
			return fmt.Sprintf("the manager's %s: %d in flight, %d waiting", m.Name, m.InFlight(), m.Waiting)
		}
	}
	samples, err := admintest.Scrape(metrics)
	if err != nil {
		return err.Error()
	}
	for k, v := range samples {
		if (strings.HasPrefix(k, "vgw_queue_depth{") || strings.HasPrefix(k, "vgw_requests_in_flight{")) && v != 0 {
			return fmt.Sprintf("/metrics %s = %v", k, v)
		}
	}
	return ""
}

// gauge sums a /metrics gauge over its models.
func (s *stack) gauge(t testing.TB, name string) float64 {
	t.Helper()
	samples, err := admintest.Scrape("http://" + s.app.httpAddr.String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for k, v := range samples {
		if strings.HasPrefix(k, name+"{") {
			sum += v
		}
	}
	return sum
}

// gate holds requests at the Envoy's router: they are then in flight at
// vgw, admitted and holding their slots. Each token lets one through.
type gate struct {
	tokens  chan struct{}
	waiting atomic.Int64
}

func newGate() *gate { return &gate{tokens: make(chan struct{})} }

func (g *gate) hold(ctx context.Context, _ *extproctest.Forwarded) error {
	g.waiting.Add(1)
	defer g.waiting.Add(-1)
	select {
	case <-g.tokens:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// burst is requests sent together, and what became of them.
type burst struct {
	mu     sync.Mutex
	counts map[int]int // by status; -1 for a harness error
	ended  int
	done   chan struct{}
}

// send sends n requests for each model, in waves of at most wave not yet
// placed (placed counts the requests vgw has queued or admitted): clients
// arrive over time rather than all in one instant. A wave too big for the
// machine makes Envoy answer 504 itself, as each request's first answer
// must come within the 200 ms message timeout (RELIABILITY.md).
func send(s *stack, models []string, n, wave int, placed func() int) *burst {
	b := &burst{counts: map[int]int{}, done: make(chan struct{})}
	var wg sync.WaitGroup
	launched := 0
	for _, m := range models {
		body := []byte(`{"model":"` + m + `","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`)
		for range n {
			for launched-placed()-b.endedCount() >= wave {
				time.Sleep(100 * time.Microsecond) // pacing, not synchronisation
			}
			launched++
			wg.Add(1)
			go func() {
				defer wg.Done()
				res, err := s.ExtProc.Do(context.Background(), extproctest.Request{Body: body})
				status := -1
				if err == nil {
					status = res.Status
				}
				b.mu.Lock()
				b.counts[status]++
				b.ended++
				b.mu.Unlock()
			}()
		}
	}
	go func() { wg.Wait(); close(b.done) }()
	return b
}

func (b *burst) endedCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.ended
}

func (b *burst) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return fmt.Sprint(b.counts)
}

// release lets the held requests through, at most wave unfinished at a
// time, and waits for every request of the burst to end.
func (b *burst) release(g *gate, total, wave int) map[int]int {
	for released := 0; released < total; released++ {
		for released-b.endedCount() >= wave {
			time.Sleep(100 * time.Microsecond) // pacing, not synchronisation
		}
		select {
		case g.tokens <- struct{}{}:
		case <-b.done:
			released = total
		}
	}
	<-b.done
	return b.counts
}

// TestLoad holds vgw at its limits through the whole stack (Envoy's role
// in front, the sim runtime's servers behind) and checks that once the
// load has passed, every count is back to zero and no goroutine is left:
// first one model with requests queued behind its busy slots, then many
// models with every slot in flight. Reduced here; `make soak` runs 10,000
// queued and 50 models × 200 in flight (RELIABILITY.md).
func TestLoad(t *testing.T) {
	// Requests arriving at once, unplaced; under -race the machine takes fewer
	// within the message timeout.
	wave := scale(32, 256)
	if *waveFlag > 0 {
		wave = *waveFlag
	}
	// In CI the Envoy's message timer stands still: what is checked is
	// that every request is admitted, queued and released exactly once,
	// not how fast two shared cores answer a burst (a 504 from the timer
	// made the test fail on a busy machine). At full scale the real 200 ms
	// applies, as the burst figures in RELIABILITY.md need it.
	var envoyOpts []envoytest.Option
	if *soak || *waveFlag > 0 {
		envoyOpts = append(envoyOpts, envoytest.WithClock(clockwork.NewRealClock()))
	}
	t.Run("queued on one model", func(t *testing.T) {
		queued := scale(2000, 10000)
		s := startStack(t, fmt.Sprintf(`
runtime: {kind: sim}
max_concurrent: 4
max_queue: %d
queue_timeout: 10m
gpus: [{name: sim0, memory: 80GiB}]
models:
  one: {vram: 10GiB}
`, queued), envoyOpts...)
		warmUp(t, s, "one")
		before := goleak.IgnoreCurrent()
		g := newGate()
		s.BeforeUpstream = g.hold
		start := time.Now()
		b := send(s, []string{"one"}, queued+4, wave, func() int {
			st, _ := s.app.ep.Stats("one")
			return st.InFlight + st.Queued
		})
		s.eventuallyWithin(t, time.Duration(scale(60, 300))*time.Second, "4 in flight and the rest queued", func() bool {
			if n := b.endedCount(); n > 0 {
				t.Fatalf("%d requests ended before all were in place: %v", n, b)
			}
			st, _ := s.app.ep.Stats("one")
			return st.InFlight == 4 && st.Queued == queued && g.waiting.Load() == 4
		}, func() string {
			st, _ := s.app.ep.Stats("one")
			outcomes := map[string]int{}
			for _, d := range s.app.ep.Decisions().Recent(extproc.Filter{}) {
				outcomes[d.Outcome.String()+"/"+d.Reason.String()+"/"+fmt.Sprint(d.Status)]++
			}
			return fmt.Sprintf("%d in flight, %d queued, %d at the router; decisions %v; ended %v", st.InFlight, st.Queued, g.waiting.Load(), outcomes, b)
		})
		inPlace := time.Since(start)
		if d, f := s.gauge(t, "vgw_queue_depth"), s.gauge(t, "vgw_requests_in_flight"); d != float64(queued) || f != 4 {
			t.Errorf("/metrics: queue depth %v, in flight %v; want %d and 4", d, f, queued)
		}
		peak := runtime.NumGoroutine()
		counts := b.release(g, queued+4, wave)
		drained := time.Since(start) - inPlace
		if counts[200] != queued+4 {
			t.Fatalf("statuses %v, want %d × 200", counts, queued+4)
		}
		s.settled(t, time.Minute)
		noLeaks(t, before)
		t.Logf("%d queued behind 4 in flight: in place after %v, drained in %v; %d goroutines at the peak, back to the baseline",
			queued, inPlace.Round(time.Millisecond), drained.Round(time.Millisecond), peak)
	})
	t.Run("many models in flight", func(t *testing.T) {
		models, per := scale(10, 50), scale(50, 200)
		var cfg strings.Builder
		fmt.Fprintf(&cfg, "runtime: {kind: sim}\nmax_concurrent: %d\nmax_queue: %d\nqueue_timeout: 10m\ngpus: [{name: sim0, memory: %dGiB}]\nmodels:\n", per, per, models)
		names := make([]string, models)
		for i := range names {
			names[i] = fmt.Sprintf("m%02d", i)
			fmt.Fprintf(&cfg, "  %s: {vram: 1GiB, always_on: true}\n", names[i])
		}
		s := startStack(t, cfg.String(), envoyOpts...)
		for _, m := range names {
			warmUp(t, s, m)
		}
		before := goleak.IgnoreCurrent()
		g := newGate()
		s.BeforeUpstream = g.hold
		start := time.Now()
		b := send(s, names, per, wave, func() int { return int(g.waiting.Load()) })
		s.eventuallyWithin(t, time.Duration(scale(60, 300))*time.Second, "every slot of every model in flight", func() bool {
			if n := b.endedCount(); n > 0 {
				t.Fatalf("%d requests ended before all were in place: %v", n, b)
			}
			return g.waiting.Load() == int64(models*per)
		}, func() string { return fmt.Sprintf("%d at the router; ended %v", g.waiting.Load(), b) })
		inPlace := time.Since(start)
		for _, m := range names {
			if st, _ := s.app.ep.Stats(m); st.InFlight != per || st.Queued != 0 {
				t.Fatalf("%s: %d in flight, %d queued; want %d and 0", m, st.InFlight, st.Queued, per)
			}
		}
		if f := s.gauge(t, "vgw_requests_in_flight"); f != float64(models*per) {
			t.Errorf("/metrics in flight %v, want %d", f, models*per)
		}
		peak := runtime.NumGoroutine()
		counts := b.release(g, models*per, wave)
		drained := time.Since(start) - inPlace
		if counts[200] != models*per {
			t.Fatalf("statuses %v, want %d × 200", counts, models*per)
		}
		s.settled(t, time.Minute)
		noLeaks(t, before)
		t.Logf("%d models × %d in flight: in place after %v, drained in %v; %d goroutines at the peak, back to the baseline",
			models, per, inPlace.Round(time.Millisecond), drained.Round(time.Millisecond), peak)
	})
}

// noLeaks fails unless every goroutine started since before has ended:
// thousands of streams take a while to wind down on a busy machine, so
// it looks again for up to a minute (goleak's own retries stop after
// half a second). An HTTP client's pooled keep-alive connection is not a
// leak: the pool is emptied before each look, as a request (a scrape, a last
// answer) may have returned one to it since the last.
func noLeaks(t *testing.T, before goleak.Option) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		http.DefaultClient.CloseIdleConnections()
		if goleak.Find(before) == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond) // polling interval
	}
	goleak.VerifyNone(t, before)
}

// warmUp loads model and sends one request through, so that the
// connections a run keeps (gRPC, the model's server) exist before the
// goroutine baseline is taken.
func warmUp(t *testing.T, s *stack, model string) {
	t.Helper()
	if r := s.ask(t, model); r.Status != 200 {
		t.Fatalf("warming %s: %d %s", model, r.Status, r.Body)
	}
	s.settled(t, time.Minute)
	http.DefaultClient.CloseIdleConnections()
}

// eventuallyWithin polls cond until it holds or the time is up, when it
// fails with what state says.
func (s *stack) eventuallyWithin(t testing.TB, within time.Duration, what string, cond func() bool, state func() string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			why := ""
			if state != nil {
				why = state()
			}
			t.Fatalf("not %s within %v: %s", what, within, why)
		}
		time.Sleep(5 * time.Millisecond) // polling interval
	}
}
