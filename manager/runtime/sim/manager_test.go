package sim_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/internal/fakevllm"
	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/manager/gpu"
	"github.com/vgw-project/vgw/manager/managertest"
	"github.com/vgw-project/vgw/manager/runtime"
	"github.com/vgw-project/vgw/manager/runtime/sim"
)

// These tests run a whole manager on the sim runtime: every model's
// server is a real fake vLLM process, its memory charged to declared GPUs.
// The manager's decisions alone are table-tested in package manager.

// The test binary doubles as the fake vLLM the sim runtime starts: run
// with VGW_TEST_FAKEVLLM=1 it is fakevllm, not the tests.
func TestMain(m *testing.M) {
	if os.Getenv("VGW_TEST_FAKEVLLM") == "1" {
		os.Exit(fakevllm.Main(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Setenv("VGW_TEST_FAKEVLLM", "1")
	// A binary built with -race sleeps a second as it exits (GORACE's
	// atexit_sleep_ms); the fake vLLM servers must stop as fast as real
	// ones would.
	os.Setenv("GORACE", strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	os.Exit(m.Run())
}

// countingRuntime counts starts by model, and keeps the process of each
// server it started.
type countingRuntime struct {
	*sim.Runtime
	mu       sync.Mutex
	starts   map[string]int
	pids     map[string]int // by instance ID
	startErr error          // when set, every start fails with it
}

func (c *countingRuntime) Start(ctx context.Context, spec runtime.Spec) (*runtime.Instance, error) {
	c.mu.Lock()
	c.starts[spec.Model]++
	err := c.startErr
	c.mu.Unlock()
	if err != nil {
		return nil, err
	}
	inst, err := c.Runtime.Start(ctx, spec)
	if err == nil {
		c.mu.Lock()
		c.pids[inst.ID] = inst.PIDs[0] // the fake's one process
		c.mu.Unlock()
	}
	return inst, err
}

func (c *countingRuntime) failStarts(err error) {
	c.mu.Lock()
	c.startErr = err
	c.mu.Unlock()
}

func (c *countingRuntime) count(model string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.starts[model]
}

// pid is the process of a sim instance it started.
func (c *countingRuntime) pid(t *testing.T, instance string) int {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	pid, ok := c.pids[instance]
	if !ok {
		t.Fatalf("no process for instance %s", instance)
	}
	return pid
}

// testManager is a manager on the sim runtime, with what the tests look
// at around it.
type testManager struct {
	*manager.Manager
	cfg  *config.Config // as it started
	fps  *manager.Footprints
	gpus *gpu.Declared
	rt   *countingRuntime // set by startManager and startManagerOpts

	mu     sync.Mutex
	events []manager.Event
}

func (tm *testManager) addEvent(e manager.Event) {
	tm.mu.Lock()
	tm.events = append(tm.events, e)
	tm.mu.Unlock()
}

// eventKinds lists the kinds of model's events in order, progress events
// left out.
func (tm *testManager) eventKinds(model string) []string {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	var out []string
	for _, e := range tm.events {
		if e.Model == model && e.Kind != manager.EventProgress { // a load's progress: see progress_test.go
			out = append(out, e.Kind)
		}
	}
	return out
}

// event returns the first event of kind for model.
func (tm *testManager) event(t *testing.T, model, kind string) manager.Event {
	t.Helper()
	tm.mu.Lock()
	defer tm.mu.Unlock()
	for _, e := range tm.events {
		if e.Model == model && e.Kind == kind {
			return e
		}
	}
	t.Fatalf("no %s event for %s", kind, model)
	return manager.Event{}
}

// eventIndex is where the first event of kind for model is among all
// events told; -1 when there is none.
func (tm *testManager) eventIndex(model, kind string) int {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	return slices.IndexFunc(tm.events, func(e manager.Event) bool { return e.Model == model && e.Kind == kind })
}

// allEvents lists every event told, as model/kind.
func (tm *testManager) allEvents() []string {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	var out []string
	for _, e := range tm.events {
		out = append(out, e.Model+"/"+e.Kind)
	}
	return out
}

func (tm *testManager) eventAt(model, kind string) (time.Time, bool) {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	for _, e := range tm.events {
		if e.Model == model && e.Kind == kind {
			return e.Time, true
		}
	}
	return time.Time{}, false
}

// status is the model called name in the manager's latest View; the zero
// ModelView when there is none.
func (tm *testManager) status(name string) manager.ModelView {
	if mv := tm.View().Model(name); mv != nil {
		return *mv
	}
	return manager.ModelView{}
}

// lease leases model, with a deadline that only a hang reaches.
func (tm *testManager) lease(model string) (manager.Lease, error) {
	ctx, cancel := context.WithTimeout(context.Background(), poll.Long)
	defer cancel()
	return tm.Lease(ctx, model)
}

// leased is a lease, or why there is none.
type leased struct {
	manager.Lease
	err error
}

// leaseLater leases model on a goroutine of its own: the lease, or why
// there is none, comes on the channel.
func (tm *testManager) leaseLater(model string) <-chan leased {
	c := make(chan leased, 1)
	go func() { l, err := tm.lease(model); c <- leased{l, err} }()
	return c
}

// ensure leases model and gives the lease back at once: the model is
// ready, or why not.
func (tm *testManager) ensure(model string) error {
	l, err := tm.lease(model)
	if err == nil {
		l.Release()
	}
	return err
}

const baseConfig = `
runtime: {kind: sim}
load_timeout: 1m
drain_timeout: 2s
min_resident: 0s
inactivity_timeout: 0s
gpus:
  - {name: sim0, memory: 80GiB}
`

// startManager runs a manager on the sim runtime, with the test binary as
// the fake vLLM, counting starts and recording events, and stops every
// model when the test ends.
func startManager(t testing.TB, yaml string) *testManager {
	t.Helper()
	return startManagerOpts(t, yaml, manager.Options{})
}

// startManagerOpts is startManager with options; OnEvent is its own.
func startManagerOpts(t testing.TB, yaml string, opts manager.Options) *testManager {
	t.Helper()
	var rt *countingRuntime
	tm := startManagerWith(t, yaml, nil,
		func(r manager.Runtime) manager.Runtime {
			rt = &countingRuntime{Runtime: r.(*sim.Runtime), starts: map[string]int{}, pids: map[string]int{}}
			return rt
		},
		opts)
	tm.rt = rt
	return tm
}

func TestColdStart(t *testing.T) {
	tm := startManager(t, baseConfig+"models:\n  a: {vram: 20GiB}\n")
	if l, ok := tm.TryLease("a"); ok {
		l.Release()
		t.Fatal("a cold model was ready")
	}
	l, err := tm.lease("a")
	if err != nil {
		t.Fatal(err)
	}
	addr := tm.status("a").Endpoint
	if addr == "" || addr != l.Endpoint() || managertest.Chat(addr, "a") != 200 {
		t.Fatalf("endpoint %q (leased %q) does not serve", addr, l.Endpoint())
	}
	st := tm.status("a")
	if st.State != manager.Ready || st.InFlight() != 1 || st.Footprint != "declared" || len(st.GPUs) != 1 {
		t.Fatalf("status %+v, %d in flight", st, st.InFlight())
	}
	l.Release()
	// The sim charges the declared memory to the GPU while the server runs.
	mem, _ := tm.gpus.Memory()
	if mem[0].Used != 20<<30 {
		t.Fatalf("GPU used %d, want 20GiB charged", mem[0].Used)
	}
	// Once ready, what it really uses is measured from its process.
	poll.Until(t, "a's footprint is learned", func() bool {
		fp, ok := tm.fps.Get("a", manager.Signature(tm.cfg, tm.cfg.Models["a"]))
		return ok && fp.PerGPU == 20<<30 && fp.How == "processes"
	})
	if err := tm.ensure("nope"); !errors.Is(err, manager.ErrUnknownModel) {
		t.Fatalf("unknown model: %v", err)
	}
}

// TestCoalescedLoad: 100 requests for a cold model start it once.
func TestCoalescedLoad(t *testing.T) {
	tm := startManager(t, baseConfig+"models:\n  a: {vram: 20GiB, sim: {startup_delay: 200ms}}\n")
	var wg sync.WaitGroup
	var failed atomic.Int32
	for range 100 {
		wg.Go(func() {
			if err := tm.ensure("a"); err != nil {
				failed.Add(1)
			}
		})
	}
	wg.Wait()
	if failed.Load() != 0 || tm.rt.count("a") != 1 {
		t.Fatalf("%d failed, %d starts; want 0 and exactly 1", failed.Load(), tm.rt.count("a"))
	}
}

// TestEviction: a second model that does not fit beside the first evicts
// it once it is idle, and waits while it is not.
func TestEviction(t *testing.T) {
	tm := startManager(t, baseConfig+"models:\n  a: {vram: 50GiB}\n  b: {vram: 50GiB}\n")
	la, err := tm.lease("a")
	if err != nil {
		t.Fatal(err)
	}
	// a has a request in flight: b cannot be placed, and says why when
	// its wait runs out. It runs out once b is seen waiting, which it is
	// only after its placement was judged (on the loop, as it was queued).
	ctx, runOut := expiring()
	answer := make(chan error, 1)
	go func() {
		l, err := tm.Lease(ctx, "b")
		if err == nil {
			l.Release()
		}
		answer <- err
	}()
	poll.Until(t, "b waits", func() bool { return tm.status("b").Waiting == 1 })
	runOut()
	err = <-answer
	var nr *manager.NoRoom
	if !errors.As(err, &nr) || !strings.Contains(err.Error(), "a 50.0GiB (1 in flight)") {
		t.Fatalf("b while a is busy: %v; want a NoRoom naming a", err)
	}
	// b waits for the memory instead of failing at once: releasing a lets
	// a waiting b in.
	done := tm.leaseLater("b")
	poll.Until(t, "b waits", func() bool { return tm.status("b").Waiting == 1 })
	la.Release()
	lb := <-done
	if lb.err != nil {
		t.Fatalf("b after a was released: %v", lb.err)
	}
	if st := tm.status("a"); st.State != manager.Stopped {
		t.Fatalf("a is %v, want evicted", st.State)
	}
	if kinds := strings.Join(tm.eventKinds("a"), ","); !strings.Contains(kinds, "evicted,draining,unloaded") {
		t.Fatalf("a's events %s", kinds)
	}
	lb.Release()
}

// expiring returns a context whose deadline passes when runOut is called,
// not on the clock: what a caller is told when its time runs out can be
// checked at the moment the test chooses, however slow the machine.
func expiring() (ctx context.Context, runOut func()) {
	ctx, cancel := context.WithCancel(context.Background())
	return deadlineOnCancel{ctx}, cancel
}

// deadlineOnCancel reports its cancellation as a deadline that passed.
type deadlineOnCancel struct{ context.Context }

func (c deadlineOnCancel) Err() error {
	if c.Context.Err() != nil {
		return context.DeadlineExceeded
	}
	return nil
}

// TestStartsSerialisedPerGPU: two models placed on one GPU start one after
// the other, as vLLM's memory profiling needs.
func TestStartsSerialisedPerGPU(t *testing.T) {
	tm := startManager(t, baseConfig+"models:\n  a: {vram: 20GiB, sim: {startup_delay: 150ms}}\n  b: {vram: 20GiB, sim: {startup_delay: 150ms}}\n")
	var wg sync.WaitGroup
	for _, m := range []string{"a", "b"} {
		wg.Go(func() {
			if err := tm.ensure(m); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	// A ready event is told once the model's waiters have been answered.
	poll.Until(t, "both ready events are told", func() bool {
		_, a := tm.eventAt("a", manager.EventReady)
		_, b := tm.eventAt("b", manager.EventReady)
		return a && b
	})
	aStart, _ := tm.eventAt("a", manager.EventLoadStarted)
	aReady, _ := tm.eventAt("a", manager.EventReady)
	bStart, _ := tm.eventAt("b", manager.EventLoadStarted)
	bReady, _ := tm.eventAt("b", manager.EventReady)
	// Events are told in the order they were decided, and those of one
	// decision carry its time: a load that starts as the other's ends
	// starts at the same instant, and after it.
	after := func(start, ready time.Time, m1, m2 string) bool {
		return !start.Before(ready) && tm.eventIndex(m2, manager.EventLoadStarted) > tm.eventIndex(m1, manager.EventReady)
	}
	if !(after(bStart, aReady, "a", "b") || after(aStart, bReady, "b", "a")) {
		t.Fatalf("loads overlapped on one GPU: a %v–%v, b %v–%v; events %v", aStart, aReady, bStart, bReady, tm.allEvents())
	}
}

// TestCrash: a ready model whose server dies is noticed, and the next
// request loads it again.
func TestCrash(t *testing.T) {
	tm := startManager(t, baseConfig+"models:\n  a: {vram: 20GiB, sim: {crash_after: 1}}\n")
	l, err := tm.lease("a")
	if err != nil {
		t.Fatal(err)
	}
	first := tm.status("a").Instance
	if code := managertest.Chat(l.Endpoint(), "a"); code == 200 {
		t.Fatalf("the crashing request got %d", code)
	}
	l.Release()
	poll.Until(t, "the crash is noticed", func() bool { return tm.status("a").State == manager.Stopped })
	if st := tm.status("a"); st.Endpoint != "" || st.Instance != "" {
		t.Fatalf("a crashed model still has an endpoint %q or a server %q", st.Endpoint, st.Instance)
	}
	mem, _ := tm.gpus.Memory()
	if mem[0].Used != 0 {
		t.Fatalf("a dead server still holds %d bytes", mem[0].Used)
	}
	if l, err = tm.lease("a"); err != nil {
		t.Fatal(err)
	}
	if second := tm.status("a").Instance; second == first || tm.rt.count("a") != 2 {
		t.Fatalf("instances %s then %s, %d starts; want a new one", first, second, tm.rt.count("a"))
	}
	l.Release()
}

// TestDockerAwayIsNotTheModelsFault: loads that fail because Docker cannot
// be reached are retried at the first backoff interval however many fail,
// and do not count toward the model's own failures; a failure of the
// model's own doubles the wait as usual.
func TestDockerAwayIsNotTheModelsFault(t *testing.T) {
	const base = 40 * time.Millisecond
	tm := startManagerOpts(t, baseConfig+"models:\n  a: {vram: 20GiB}\n", manager.Options{Backoff: base})
	var shown time.Time // the RetryAt the View shows for the last failure
	retryOf := func(cause error) time.Duration {
		t.Helper()
		tm.rt.failStarts(cause)
		poll.Until(t, "the backoff has passed", func() bool { return time.Now().After(tm.status("a").RetryAt) })
		var le *manager.LoadError
		if err := tm.ensure("a"); !errors.As(err, &le) || le.Earlier {
			t.Fatalf("want a fresh load failure, got %v", err)
		}
		// The View that shows the failure's backoff is published just
		// after its waiter is answered.
		poll.Until(t, "the View shows the failure's backoff", func() bool {
			r := tm.status("a").RetryAt
			if r.Equal(shown) {
				return false
			}
			shown = r
			return true
		})
		return le.Retry
	}
	away := fmt.Errorf("create container: %w", runtime.ErrUnreachable) // as the Docker runtime's errors wrap it
	for i := range 4 {
		if r := retryOf(away); r != base {
			t.Errorf("Docker away, failure %d: retried in %v, want %v", i+1, r, base)
		}
	}
	own := errors.New("its server exited")
	for i, want := range []time.Duration{base, 2 * base, 4 * base} {
		if r := retryOf(own); r != want {
			t.Errorf("the model's own failure %d: retried in %v, want %v", i+1, r, want)
		}
	}
	// After failures of its own, Docker going away is still no reason to
	// wait longer.
	if r := retryOf(away); r != base {
		t.Errorf("Docker away after the model's own failures: retried in %v, want %v", r, base)
	}
	tm.rt.failStarts(nil)
	poll.Until(t, "the backoff has passed", func() bool { return time.Now().After(tm.status("a").RetryAt) })
	if err := tm.ensure("a"); err != nil {
		t.Fatal(err)
	}
}

// TestLoadFailures: a server that never becomes healthy, or exits while
// loading, fails its waiters with the reason, and is not tried again
// during its backoff (an hour asked, BackoffMax given: the second request
// surely comes within it).
func TestLoadFailures(t *testing.T) {
	tests := []struct {
		name  string
		model string // with load_timeout
		want  string
	}{
		// The timeout must pass: the server would be ready in an hour.
		{"never healthy", "load_timeout: 300ms\nmodels:\n  m: {vram: 20GiB, sim: {startup_delay: 1h}}\n", "not healthy within load_timeout"},
		// The exit must come first, with the server's log tail: a minute
		// is more than any machine takes to start the fake and see it die.
		{"exits as it starts", "load_timeout: 1m\nmodels:\n  m: {vram: 20GiB, sim: {fail_start: true}}\n", "memory profiling"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tm := startManagerOpts(t, strings.Replace(baseConfig, "load_timeout: 1m\n", "", 1)+tt.model, manager.Options{Backoff: time.Hour})
			err := tm.ensure("m")
			var le *manager.LoadError
			if !errors.As(err, &le) {
				t.Fatalf("m: %v; want a LoadError", err)
			}
			if !strings.Contains(err.Error(), tt.want) || le.Earlier || le.RetryAfter() != manager.BackoffMax {
				t.Fatalf("m: %v (retry in %v); want a fresh LoadError saying %q, tried again in %v", err, le.RetryAfter(), tt.want, manager.BackoffMax)
			}
			err = tm.ensure("m")
			if !errors.As(err, &le) || !le.Earlier || !strings.Contains(err.Error(), tt.want) || tm.rt.count("m") != 1 {
				t.Fatalf("m again during its backoff: %v after %d starts; want the last error and no new start", err, tm.rt.count("m"))
			}
			poll.Until(t, "m's server is gone", func() bool { m, _ := tm.gpus.Memory(); return m[0].Used == 0 })
		})
	}
}

func TestInactivityUnload(t *testing.T) {
	tm := startManager(t, strings.Replace(baseConfig, "inactivity_timeout: 0s", "inactivity_timeout: 200ms", 1)+"models:\n  a: {vram: 20GiB}\n")
	l, err := tm.lease("a")
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(400 * time.Millisecond) // longer than the inactivity timeout, with a request in flight
	if st := tm.status("a").State; st != manager.Ready {
		t.Fatalf("a busy model was unloaded: %v", st)
	}
	l.Release()
	poll.Until(t, "a idle model is unloaded", func() bool { return tm.status("a").State == manager.Stopped })
}

func TestAlwaysOn(t *testing.T) {
	tm := startManager(t, strings.Replace(baseConfig, "inactivity_timeout: 0s", "inactivity_timeout: 50ms", 1)+
		"models:\n  a: {vram: 20GiB, always_on: true}\n")
	poll.Until(t, "an always_on model loads at start", func() bool { return tm.status("a").State == manager.Ready })
	time.Sleep(200 * time.Millisecond) // longer than the inactivity timeout
	if st := tm.status("a").State; st != manager.Ready {
		t.Fatalf("an always_on model was unloaded: %v", st)
	}
}

// TestUpdate: a model whose memory settings change is reloaded once idle;
// a new model can be asked for; a removed one is unknown.
func TestUpdate(t *testing.T) {
	models := "models:\n  a: {vram: 20GiB, max_model_len: 4096}\n"
	tm := startManager(t, baseConfig+models)
	l, err := tm.lease("a")
	if err != nil {
		t.Fatal(err)
	}
	first := tm.status("a").Instance
	if err := tm.Update(managertest.Config(t, baseConfig+"models:\n  a: {vram: 20GiB, max_model_len: 8192}\n  b: {vram: 20GiB}\n")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // ticks pass: a is busy, so it stays
	if st := tm.status("a"); st.State != manager.Ready || st.Instance != first {
		t.Fatalf("a busy model was reloaded: %+v", st)
	}
	l.Release()
	poll.Until(t, "a reloads once idle", func() bool { return tm.status("a").State == manager.Stopped })
	if l, err = tm.lease("a"); err != nil {
		t.Fatal(err)
	}
	if tm.status("a").Instance == first {
		t.Fatal("a kept its old server")
	}
	l.Release()
	if err := tm.ensure("b"); err != nil {
		t.Fatalf("the new model: %v", err)
	}
	if err := tm.Update(managertest.Config(t, baseConfig+"models:\n  b: {vram: 20GiB}\n")); err != nil {
		t.Fatal(err)
	}
	if err := tm.ensure("a"); !errors.Is(err, manager.ErrUnknownModel) {
		t.Fatalf("a removed model: %v", err)
	}
	poll.Until(t, "the removed model's server stops", func() bool {
		m, _ := tm.gpus.Memory()
		return m[0].Used == 20<<30
	})
}

// TestRemovedWhileLoading: a model taken out of the config while it loads
// stops loading at once: its GPU memory is freed, and it is reported
// unloaded, not failed. The load went on to its load_timeout, holding
// the memory, then logged an error and sent load_failed for a model no
// longer configured.
func TestRemovedWhileLoading(t *testing.T) {
	// An hour, beyond any wait here: the load must end as the model
	// leaves, not at its timeout.
	cfg := strings.Replace(baseConfig, "load_timeout: 1m", "load_timeout: 1h", 1)
	tm := startManager(t, cfg+"models:\n  slow: {vram: 20GiB, sim: {startup_delay: 1h}}\n  b: {vram: 20GiB}\n")
	answer := make(chan error, 1)
	go func() { answer <- tm.ensure("slow") }()
	poll.Until(t, "slow is loading on the GPU", func() bool {
		m, _ := tm.gpus.Memory()
		return tm.status("slow").State == manager.Loading && m[0].Used == 20<<30
	})
	if err := tm.Update(managertest.Config(t, cfg+"models:\n  b: {vram: 20GiB}\n")); err != nil {
		t.Fatal(err)
	}
	if err := <-answer; !errors.Is(err, manager.ErrUnknownModel) {
		t.Fatalf("the waiter of the removed model got %v, want ErrUnknownModel", err)
	}
	// The memory is freed as the server is stopped, just before the loop
	// hears how the load ended: wait for both.
	poll.Until(t, "the removed model's memory is freed, and its load has ended", func() bool {
		m, _ := tm.gpus.Memory()
		kinds := tm.eventKinds("slow")
		return m[0].Used == 0 && (slices.Contains(kinds, manager.EventUnloaded) || slices.Contains(kinds, manager.EventLoadFailed))
	})
	if kinds := tm.eventKinds("slow"); slices.Contains(kinds, manager.EventLoadFailed) || !slices.Contains(kinds, manager.EventUnloaded) {
		t.Errorf("events of the removed model: %v, want unloaded and no load_failed", kinds)
	}
}

// TestExternalMemory: memory used by processes vgw does not know about
// keeps a model off a GPU.
func TestExternalMemory(t *testing.T) {
	tm := startManager(t, baseConfig+`  - {name: sim1, memory: 80GiB}
models:
  a: {vram: 40GiB}
`)
	tm.gpus.Charge(999999, []int{0}, 60<<30) // someone else's job on GPU 0
	poll.Until(t, "the reading shows it", func() bool {
		gs := tm.View().GPUs
		return len(gs) == 2 && gs[0].Used == 60<<30
	})
	l, err := tm.lease("a")
	if err != nil {
		t.Fatal(err)
	}
	if gs := tm.status("a").GPUs; len(gs) != 1 || gs[0] != 1 {
		t.Fatalf("a placed on %v, want GPU 1", gs)
	}
	l.Release()
}

// TestSignature: settings that change a server's memory change its
// signature.
func TestSignature(t *testing.T) {
	m := &config.Model{Repo: "meta-llama/Llama-3.1-8B", MaxModelLen: 8192, TensorParallelSize: 2, Quantization: "awq", ExtraArgs: []string{"--enforce-eager"}}
	if fmt.Sprint(manager.Signature(&config.Config{}, m)) == manager.Signature(&config.Config{}, &config.Model{Repo: m.Repo}) {
		t.Fatal("signatures of different settings are equal")
	}
}

// noProcesses is an inventory whose driver lists no processes, as NVML in
// a container without the host PID namespace.
type noProcesses struct{ *gpu.Declared }

func (noProcesses) Processes() ([]gpu.Process, error) { return nil, nil }

// TestFootprintByDelta: without per-process figures, a model's footprint
// is the rise in its GPU's used memory across its load.
func TestFootprintByDelta(t *testing.T) {
	cfg := managertest.Config(t, baseConfig+"models:\n  a: {vram: 20GiB}\n")
	gpus := gpu.NewDeclared([]gpu.GPU{{Name: "sim0", Total: 80 << 30}})
	gpus.Charge(1, []int{0}, 5<<30) // someone else's, before and after
	exe, _ := os.Executable()
	fps, err := manager.OpenFootprints("")
	if err != nil {
		t.Fatal(err)
	}
	m := manager.New(cfg, sim.New([]string{exe}, gpus), noProcesses{gpus}, manager.Options{Footprints: fps, Tick: 20 * time.Millisecond, GPUPoll: 20 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Run(ctx); close(done) }()
	defer func() { m.StopAll(context.Background()); cancel(); <-done }()
	l, err := m.Lease(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	l.Release()
	poll.Until(t, "a's footprint is learned by difference", func() bool {
		fp, ok := fps.Get("a", manager.Signature(cfg, cfg.Models["a"]))
		return ok && fp.PerGPU == 20<<30 && fp.How == "delta"
	})
}

// startManagerWith runs a manager on the sim runtime over the config's
// declared GPUs, with the test binary as the fake vLLM, recording its
// events; inv and wrap, when set, stand in for or wrap the inventory and
// the runtime. Its footprints are opts.Footprints, else new ones in
// memory. Every model is stopped when the test ends.
func startManagerWith(t testing.TB, yaml string, inv func(*gpu.Declared) manager.Inventory, wrap func(manager.Runtime) manager.Runtime, opts manager.Options) *testManager {
	t.Helper()
	cfg := managertest.Config(t, yaml)
	var gs []gpu.GPU
	for _, g := range cfg.GPUs.Declared {
		gs = append(gs, gpu.GPU{Name: g.Name, Total: uint64(g.Memory)})
	}
	gpus := gpu.NewDeclared(gs)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var rt manager.Runtime = sim.New([]string{exe}, gpus)
	if wrap != nil {
		rt = wrap(rt)
	}
	var in manager.Inventory = gpus
	if inv != nil {
		in = inv(gpus)
	}
	if opts.Tick == 0 {
		opts.Tick, opts.GPUPoll = 20*time.Millisecond, 20*time.Millisecond
	}
	if opts.Footprints == nil {
		if opts.Footprints, err = manager.OpenFootprints(""); err != nil {
			t.Fatal(err)
		}
	}
	tm := &testManager{cfg: cfg, fps: opts.Footprints, gpus: gpus}
	opts.OnEvent = tm.addEvent
	tm.Manager = manager.New(cfg, rt, in, opts)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { tm.Run(ctx); close(done) }()
	t.Cleanup(func() {
		stop, c := context.WithTimeout(context.Background(), poll.Long)
		defer c()
		if err := tm.StopAll(stop); err != nil {
			t.Errorf("StopAll: %v", err)
		}
		cancel()
		<-done
	})
	return tm
}

// TestReloadedModelStays: after its settings change and it reloads, the
// model's new server is not unloaded again.
func TestReloadedModelStays(t *testing.T) {
	tm := startManagerWith(t, baseConfig+"models:\n  a: {vram: 20GiB, max_model_len: 4096}\n", nil, nil, manager.Options{})
	if err := tm.ensure("a"); err != nil {
		t.Fatal(err)
	}
	if err := tm.Update(managertest.Config(t, baseConfig+"models:\n  a: {vram: 20GiB, max_model_len: 8192}\n")); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "a reloads", func() bool { return tm.status("a").State == manager.Stopped })
	if err := tm.ensure("a"); err != nil {
		t.Fatal(err)
	}
	second := tm.status("a").Instance
	time.Sleep(200 * time.Millisecond) // ten ticks
	if st := tm.status("a"); st.State != manager.Ready || st.Instance != second {
		t.Fatalf("the reloaded model went again: %+v", st)
	}
}

// TestNoPingPong: two models that cannot share the GPU, asked for in turn
// by concurrent clients, each get served; a model that just became ready is
// not evicted before its waiting requests run.
func TestNoPingPong(t *testing.T) {
	tm := startManagerWith(t, baseConfig+"models:\n  a: {vram: 60GiB}\n  b: {vram: 60GiB}\n", nil, nil, manager.Options{})
	var wg sync.WaitGroup
	var failed atomic.Int32
	for _, model := range []string{"a", "b"} {
		wg.Go(func() {
			for range 5 {
				if err := tm.ensure(model); err != nil {
					t.Logf("%s: %v", model, err)
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d requests failed", n)
	}
}

// TestAlwaysOnRetriedAfterFailure: an always_on model whose load fails is
// tried again once its backoff has passed.
func TestAlwaysOnRetriedAfterFailure(t *testing.T) {
	var starts atomic.Int32
	startManagerWith(t, baseConfig+"models:\n  a: {vram: 20GiB, always_on: true, sim: {fail_start: true}}\n", nil,
		func(rt manager.Runtime) manager.Runtime { return startHook{rt, func() { starts.Add(1) }} }, manager.Options{Backoff: 50 * time.Millisecond})
	poll.Until(t, "a second try", func() bool { return starts.Load() >= 2 })
}

// startHook calls f on each start.
type startHook struct {
	manager.Runtime
	f func()
}

func (h startHook) Start(ctx context.Context, spec runtime.Spec) (*runtime.Instance, error) {
	h.f()
	return h.Runtime.Start(ctx, spec)
}

// exitFirst is a runtime whose Start returns only once the server it
// started has exited and the manager's loop has taken the exit: the exit
// overtakes the news of the start, as it may when a server dies at once.
type exitFirst struct {
	manager.Runtime
	exits chan runtime.Exit // unbuffered: a send ends once the loop has the exit
	taken chan string       // the IDs of the exits the loop has taken
}

func newExitFirst(t *testing.T, rt manager.Runtime) *exitFirst {
	x := &exitFirst{Runtime: rt, exits: make(chan runtime.Exit), taken: make(chan string, 64)}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel) // registered before the manager's: after it stopped
	go func() {
		for {
			select {
			case e := <-rt.Exits():
				select {
				case x.exits <- e:
					x.taken <- e.ID
				case <-ctx.Done():
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	return x
}

func (x *exitFirst) Exits() <-chan runtime.Exit { return x.exits }

func (x *exitFirst) Start(ctx context.Context, spec runtime.Spec) (*runtime.Instance, error) {
	inst, err := x.Runtime.Start(ctx, spec)
	if err != nil {
		return inst, err
	}
	for {
		select {
		case id := <-x.taken:
			if id == inst.ID {
				return inst, nil
			}
		case <-ctx.Done():
			return inst, nil
		}
	}
}

// TestExitBeforeStartReported: a server that exits before its start is
// reported fails the load at once, with its log, not at load_timeout (an
// hour: a load that missed the exit would outlast the test's wait).
func TestExitBeforeStartReported(t *testing.T) {
	tm := startManagerWith(t, strings.Replace(baseConfig, "load_timeout: 1m", "load_timeout: 1h", 1)+"models:\n  a: {vram: 20GiB, sim: {fail_start: true}}\n", nil,
		func(rt manager.Runtime) manager.Runtime { return newExitFirst(t, rt) }, manager.Options{})
	err := tm.ensure("a")
	var le *manager.LoadError
	if !errors.As(err, &le) || !strings.Contains(err.Error(), "memory profiling") {
		t.Fatalf("%v; want the exit with its log", err)
	}
}

// TestFootprintUnderRunningSettings: settings changed during a load; the
// footprint measured is filed under the settings the server ran. The
// server stays loading until the test has changed the settings.
func TestFootprintUnderRunningSettings(t *testing.T) {
	old := baseConfig + "models:\n  a: {vram: 20GiB, max_model_len: 4096, env: {FAKEVLLM_READY_ON_SIGNAL: USR1}}\n"
	tm := startManager(t, old)
	done := tm.leaseLater("a")
	poll.Until(t, "a's server runs", func() bool { return tm.status("a").Instance != "" })
	newCfg := managertest.Config(t, strings.Replace(old, "4096", "8192", 1))
	if err := tm.Update(newCfg); err != nil {
		t.Fatal(err)
	}
	if st := tm.status("a"); st.State != manager.Loading {
		t.Fatalf("a is %v once its settings changed, want still loading", st.State)
	}
	tm.readyNow(t, "a")
	l := <-done
	if l.err != nil {
		t.Fatal(l.err)
	}
	oldCfg := managertest.Config(t, old)
	poll.Until(t, "the footprint is filed", func() bool {
		_, ok := tm.fps.Get("a", manager.Signature(oldCfg, oldCfg.Models["a"]))
		return ok
	})
	if _, ok := tm.fps.Get("a", manager.Signature(newCfg, newCfg.Models["a"])); ok {
		t.Fatal("the old server's footprint was filed under the new settings")
	}
	l.Release()
}

// readyNow ends the load of a model whose fake waits for SIGUSR1
// (FAKEVLLM_READY_ON_SIGNAL), once its /health answers: the fake catches
// the signal before it serves, so the signal cannot come too early.
func (tm *testManager) readyNow(t *testing.T, model string) {
	t.Helper()
	st := tm.status(model)
	poll.Until(t, model+"'s server answers", func() bool { return managertest.Answers(st.Addr) })
	if err := syscall.Kill(tm.rt.pid(t, st.Instance), syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
}

// TestLoadingModelNotCountedTwice: without per-process figures, a loading
// model's memory is its reservation, not also someone else's.
func TestLoadingModelNotCountedTwice(t *testing.T) {
	tm := startManagerWith(t, baseConfig+"models:\n  big: {vram: 50GiB, sim: {startup_delay: 1h}}\n  small: {vram: 20GiB}\n",
		func(d *gpu.Declared) manager.Inventory { return noProcesses{d} }, nil, manager.Options{})
	bigDone := make(chan error, 1)
	go func() { bigDone <- tm.ensure("big") }()
	poll.Until(t, "big's server runs, and a GPU reading shows it", func() bool {
		return tm.status("big").Instance != "" && tm.View().GPUs[0].Used == 50<<30
	})
	done := tm.leaseLater("small")
	// small is placed beside big at once (its start then waits for big's,
	// as starts on one GPU are serialised), not held back for memory.
	poll.Until(t, "small is placed", func() bool { return tm.status("small").State == manager.Loading })
	if st := tm.status("big"); st.State != manager.Loading {
		t.Fatalf("big is %v: small was placed only after big was ready", st.State)
	}
	// big would load for an hour: unloading it lets small start.
	if err := tm.Unload("big"); err != nil {
		t.Fatal(err)
	}
	if err := <-bigDone; !errors.Is(err, manager.ErrUnloaded) {
		t.Errorf("big's waiter got %v, want ErrUnloaded", err)
	}
	small := <-done
	if small.err != nil {
		t.Fatal(small.err)
	}
	small.Release()
}

// TestUnloadWhileLoading: unloading a loading model ends the load, answers
// its waiters, and costs no backoff.
func TestUnloadWhileLoading(t *testing.T) {
	tm := startManagerWith(t, baseConfig+"models:\n  a: {vram: 20GiB, sim: {startup_delay: 1h}}\n", nil, nil, manager.Options{})
	done := make(chan error, 1)
	go func() { done <- tm.ensure("a") }()
	poll.Until(t, "a is loading", func() bool { return tm.status("a").Instance != "" })
	if err := tm.Unload("a"); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, manager.ErrUnloaded) {
		t.Fatalf("waiter got %v", err)
	}
	poll.Until(t, "a is stopped", func() bool { return tm.status("a").State == manager.Stopped })
	if st := tm.status("a"); !st.RetryAt.IsZero() && time.Now().Before(st.RetryAt) {
		t.Fatalf("an unload set a backoff until %v", st.RetryAt)
	}
}

// TestOperatorLoad: an operator's load places a model no request waits
// for; with wait it returns once the model is ready, not counted in; after
// a failure it is tried again at once rather than answered with the
// backoff's error (the operator may have fixed the cause).
func TestOperatorLoad(t *testing.T) {
	tm := startManager(t, baseConfig+"models:\n  a: {vram: 20GiB, sim: {startup_delay: 50ms}}\n  b: {vram: 70GiB}\n  broken: {vram: 10GiB, sim: {fail_start: true}}\n")
	ctx, cancel := context.WithTimeout(context.Background(), poll.Long)
	defer cancel()

	if err := tm.Load(ctx, "a", false); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "a is ready though no request asked", func() bool { return tm.status("a").State == manager.Ready })

	// b needs a's memory: a, idle, is evicted.
	if err := tm.Load(ctx, "b", true); err != nil {
		t.Fatal(err)
	}
	if st := tm.status("b"); st.State != manager.Ready || st.InFlight() != 0 {
		t.Errorf("b after a waited load: %v with %d in flight", st.State, st.InFlight())
	}
	if kinds := tm.eventKinds("a"); !slices.Contains(kinds, manager.EventEvicted) {
		t.Errorf("a's events %v: not evicted for b", kinds)
	}

	var le *manager.LoadError
	for try := 1; try <= 2; try++ {
		if err := tm.Load(ctx, "broken", true); !errors.As(err, &le) {
			t.Fatalf("load %d of broken: %v", try, err)
		}
		if n := tm.rt.count("broken"); n != try {
			t.Fatalf("after load %d of broken, %d starts", try, n)
		}
	}
	if err := tm.Load(ctx, "nope", false); !errors.Is(err, manager.ErrUnknownModel) {
		t.Errorf("unknown model: %v", err)
	}
}

// stopGate is a runtime whose Stop waits until the test opens the gate.
type stopGate struct {
	manager.Runtime
	open chan struct{}
}

func (g stopGate) Stop(ctx context.Context, inst *runtime.Instance, grace time.Duration) error {
	<-g.open
	return g.Runtime.Stop(ctx, inst, grace)
}

// TestReaddedWhileItsLoadEnds: a model taken out of the config while it
// loads, and put back before its cancelled load has ended, serves the
// request that asked for it since: the next load starts once the old one
// has stopped. That request was answered "unloaded while it was loading",
// a 503, by the end of the old load.
func TestReaddedWhileItsLoadEnds(t *testing.T) {
	gate := stopGate{open: make(chan struct{})}
	tm := startManagerWith(t, baseConfig+"models:\n  a: {vram: 20GiB, sim: {startup_delay: 1h}}\n", nil,
		func(rt manager.Runtime) manager.Runtime { gate.Runtime = rt; return gate }, manager.Options{})
	first := make(chan error, 1)
	go func() { first <- tm.ensure("a") }()
	poll.Until(t, "a loads", func() bool { return tm.status("a").Instance != "" })
	if err := tm.Update(managertest.Config(t, baseConfig+"models:\n  b: {vram: 20GiB}\n")); err != nil {
		t.Fatal(err)
	}
	if err := <-first; !errors.Is(err, manager.ErrUnknownModel) {
		t.Fatalf("the request of the removed model: %v", err)
	}
	if err := tm.Update(managertest.Config(t, baseConfig+"models:\n  a: {vram: 20GiB}\n  b: {vram: 20GiB}\n")); err != nil {
		t.Fatal(err)
	}
	second := tm.leaseLater("a")
	poll.Until(t, "the second request waits", func() bool { return tm.status("a").Waiting == 1 })
	close(gate.open) // the old load's server stops, and its load ends
	l := <-second
	if l.err != nil {
		t.Fatalf("the request made once a was back: %v", l.err)
	}
	l.Release()
}
