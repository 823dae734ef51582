package manager

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vgw-project/vgw/manager/gpu"
	"github.com/vgw-project/vgw/manager/managertest"
	"github.com/vgw-project/vgw/manager/runtime"
)

// The scheduler's decisions, table-tested: each test feeds it events at
// times it chooses and reads the actions it decides, the waiters it
// answers and the Views it publishes. Nothing runs: no process, no
// goroutine, no clock.

const schedConfig = `
runtime: {kind: sim}
load_timeout: 1m
drain_timeout: 2s
min_resident: 0s
inactivity_timeout: 0s
probe_interval: 0s
gpus:
  - {name: sim0, memory: 80GiB}
`

// rig drives one scheduler.
type rig struct {
	t     *testing.T
	s     *scheduler
	b     *board
	now   time.Time
	fps   footprintMap
	insts int
}

// footprintMap is a footprint store in memory.
type footprintMap map[string]Footprint

func (f footprintMap) Get(model, sig string) (Footprint, bool) {
	fp, ok := f[model]
	return fp, ok && fp.Signature == sig
}

func newRig(t *testing.T, yaml string) *rig {
	t.Helper()
	r := &rig{t: t, now: time.Unix(1_000_000, 0), fps: footprintMap{}}
	cfg := managertest.Config(t, yaml)
	var gpus []gpu.GPU
	for i, g := range cfg.GPUs.Declared {
		gpus = append(gpus, gpu.GPU{Index: i, Name: g.Name, Total: uint64(g.Memory)})
	}
	r.b = newBoard(r.now)
	r.s = newScheduler(cfg, gpus, r.fps, BackoffBase, r.b, r.now)
	return r
}

// at runs f at the rig's time and returns the actions decided, described.
func (r *rig) at(f func(now time.Time)) []string {
	r.t.Helper()
	f(r.now)
	var out []string
	for _, a := range r.s.take() {
		if ans, ok := a.(answer); ok {
			ans.send(r.b) // told, as the executor tells them
			continue
		}
		if d := describe(a); d != "" {
			out = append(out, d)
		}
	}
	return out
}

// flush carries out what was decided, telling the answers and dropping
// the rest.
func (r *rig) flush() { r.at(func(time.Time) {}) }

func (r *rig) advance(d time.Duration) { r.now = r.now.Add(d) }

// want asks for a model as a request does, and returns its waiter.
func (r *rig) want(name string) *waiter {
	w := &waiter{reply: make(chan reply, 1)}
	r.s.want(r.now, name, w)
	return w
}

// expect checks that f decides exactly want (logging aside).
func (r *rig) expect(what string, f func(now time.Time), want ...string) {
	r.t.Helper()
	if got := r.at(f); !slices.Equal(got, want) {
		r.t.Fatalf("%s:\n got  %q\n want %q", what, got, want)
	}
}

// inst is a server the runtime started for model.
func (r *rig) inst(model string, gpus ...int) *runtime.Instance {
	r.insts++
	md := r.s.models[model]
	return &runtime.Instance{ID: fmt.Sprintf("i%d", r.insts), Model: model, Addr: fmt.Sprintf("10.0.0.%d:8000", r.insts),
		GPUs: gpus, Launch: md.launch, Signature: md.sig}
}

// loading returns model and the load the scheduler started for it.
func (r *rig) loading(name string) (*model, *loadOp) {
	r.t.Helper()
	md := r.s.models[name]
	if md.loading == nil {
		r.t.Fatalf("%s is not loading (%v)", name, md.state)
	}
	return md, md.loading
}

// start takes the load the scheduler started for model: the server runs
// and answers its health checks.
func (r *rig) start(model string) *runtime.Instance {
	r.t.Helper()
	md, op := r.loading(model)
	inst := r.inst(model, md.place.gpus...)
	r.s.started(md, op, inst)
	r.s.loaded(r.now, md, op, time.Second, nil)
	r.flush()
	return inst
}

// ready loads model by a request and gives the request back: it is ready
// and idle.
func (r *rig) ready(model string) *runtime.Instance {
	r.t.Helper()
	w := r.want(model)
	r.flush()
	inst := r.start(model)
	l := r.answered(w)
	l.Release()
	return inst
}

// answered is w's answer, which must be a lease.
func (r *rig) answered(w *waiter) Lease {
	r.t.Helper()
	r.flush()
	select {
	case rep := <-w.reply:
		if rep.err != nil {
			r.t.Fatalf("answered %v, want a lease", rep.err)
		}
		return Lease{rep.m}
	default:
		r.t.Fatal("not answered")
	}
	return Lease{}
}

// failed is w's answer, which must be an error.
func (r *rig) failed(w *waiter) error {
	r.t.Helper()
	r.flush()
	select {
	case rep := <-w.reply:
		if rep.err == nil {
			r.t.Fatal("answered with a lease, want an error")
		}
		return rep.err
	default:
		r.t.Fatal("not answered")
	}
	return nil
}

func unanswered(t *testing.T, w *waiter) {
	t.Helper()
	if len(w.reply) > 0 {
		t.Fatalf("answered: %+v", <-w.reply)
	}
}

// state is the model as the latest View shows it.
func (r *rig) view(model string) *ModelView {
	r.t.Helper()
	mv := r.b.view().Model(model)
	if mv == nil {
		r.t.Fatalf("%s is not in the View", model)
	}
	return mv
}

// describe names an action for the tables; logging is left out.
func describe(a action) string {
	switch a := a.(type) {
	case startServer:
		return fmt.Sprintf("start %s on %v", a.spec.Model, gpuIndexes(a.spec.GPUs))
	case resumeServer:
		return "resume " + a.inst.ID
	case cancelLoad:
		return "cancel a load"
	case sleepServer:
		return fmt.Sprintf("sleep %s at level %d", a.md.name, a.level)
	case wakeServer:
		return fmt.Sprintf("wake %s from level %d", a.md.name, a.op.level)
	case stopServer:
		if a.md == nil {
			return fmt.Sprintf("stop stray %s", a.inst.ID)
		}
		return fmt.Sprintf("stop %s within %v", a.md.name, a.grace)
	case probeServer:
		return "probe " + a.md.name
	case measureServer:
		return "measure " + a.model
	case listPIDs:
		return "list " + a.md.name
	case rereadGPUs:
		return "reread GPUs"
	case saveFootprint:
		return fmt.Sprintf("save %s %s %s", a.model, gib(int64(a.fp.PerGPU)), a.fp.How)
	case saveSleep:
		return fmt.Sprintf("save %s asleep at level %d: %s of each GPU, %s of host memory", a.model, a.level, gib(int64(a.residual)), gib(int64(a.host)))
	case tell:
		return a.e.Kind + " " + a.e.Model
	case logLine:
		return ""
	}
	return fmt.Sprintf("%T", a)
}

func gpuIndexes(gs []gpu.GPU) []int {
	var out []int
	for _, g := range gs {
		out = append(out, g.Index)
	}
	return out
}

const readyTail = "measure %s|list %s|reread GPUs"

func seq(s string, args ...any) []string { return strings.Split(fmt.Sprintf(s, args...), "|") }

// TestColdStartDecisions: a request for a stopped model places it and
// starts its server; it is answered once the server is healthy, counted
// in, with the server's address; another request while it loads waits
// for the same load.
func TestColdStartDecisions(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n")
	var w1, w2 *waiter
	r.expect("first request", func(time.Time) { w1 = r.want("a") }, "load_started a", "start a on [0]")
	r.expect("second request", func(time.Time) { w2 = r.want("a") })
	r.expect("a tick: the View counts waiters at most a tick late", func(now time.Time) { r.s.tick(now) })
	if v := r.view("a"); v.State != Loading || v.Waiting != 2 || v.Endpoint != "" {
		t.Fatalf("while loading: %+v", v)
	}
	unanswered(t, w1)
	md := r.s.models["a"]
	inst := r.inst("a", 0)
	r.expect("server started", func(time.Time) { r.s.started(md, md.loading, inst) })
	r.advance(3 * time.Second)
	r.expect("healthy", func(now time.Time) { r.s.loaded(now, md, md.loading, 3*time.Second, nil) },
		append([]string{"ready a"}, seq(readyTail, "a", "a")...)...)
	l1, l2 := r.answered(w1), r.answered(w2)
	if l1.Endpoint() != inst.Addr || l2.Endpoint() != inst.Addr {
		t.Fatalf("leases at %s and %s, want %s", l1.Endpoint(), l2.Endpoint(), inst.Addr)
	}
	v := r.view("a")
	if v.State != Ready || v.Endpoint != inst.Addr || v.InFlight() != 2 || v.Waiting != 0 {
		t.Fatalf("once ready: %+v in flight %d", v, v.InFlight())
	}
	l1.Release()
	l2.Release()
	if n := v.InFlight(); n != 0 {
		t.Fatalf("%d in flight after both released", n)
	}
	r.expect("a request once ready", func(time.Time) { r.answered(r.want("a")).Release() })
}

// TestUnknownModel: a request for a model not configured is answered at
// once.
func TestUnknownModel(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n")
	if err := r.failed(r.want("b")); !errors.Is(err, ErrUnknownModel) {
		t.Fatalf("%v, want ErrUnknownModel", err)
	}
}

// TestEvictionDecisions: a model that does not fit evicts the least
// recently used idle one; its server starts only once the evicted one's
// has stopped; a busy model is not evicted, and the request waits with
// the reason.
func TestEvictionDecisions(t *testing.T) {
	const models = "models:\n  a: {vram: 50GiB}\n  b: {vram: 50GiB}\n  c: {vram: 50GiB}\n"
	t.Run("idle", func(t *testing.T) {
		r := newRig(t, schedConfig+models)
		r.ready("a")
		r.advance(time.Minute)
		var w *waiter
		r.expect("b wanted", func(time.Time) { w = r.want("b") }, "evicted a", "draining a", "stop a within 2s")
		if st := r.view("a").State; st != Draining {
			t.Fatalf("a is %v, want draining", st)
		}
		r.advance(time.Second)
		r.expect("a stopped", func(now time.Time) { r.s.stopped(now, r.s.models["a"], []int{0}, nil) },
			"reread GPUs", "unloaded a", "load_started b", "start b on [0]")
		r.start("b")
		r.answered(w).Release()
	})
	t.Run("busy", func(t *testing.T) {
		r := newRig(t, schedConfig+models)
		r.ready("a")
		busy := r.answered(r.want("a"))
		var w *waiter
		r.expect("b wanted", func(time.Time) { w = r.want("b") })
		unanswered(t, w)
		var nr *NoRoom
		if p := w.lastErr.Load(); p == nil || !errors.As(*p, &nr) {
			t.Fatalf("the waiter's reason: %v, want NoRoom", p)
		}
		if !strings.Contains(r.view("b").LastError, "a") {
			t.Fatalf("b's last error %q does not name a", r.view("b").LastError)
		}
		busy.Release()
		r.expect("a idle again, memory re-read", func(now time.Time) { r.s.gpusRead(now, &gpuReading{mem: []gpu.Memory{{Total: 80 << 30}}}) },
			"evicted a", "draining a", "stop a within 2s")
	})
	t.Run("too big for any GPU", func(t *testing.T) {
		r := newRig(t, schedConfig+"models:\n  huge: {vram: 90GiB}\n")
		var nr *NoRoom
		if err := r.failed(r.want("huge")); !errors.As(err, &nr) {
			t.Fatalf("%v, want NoRoom at once", err)
		}
	})
}

// TestStartsSerialisedPerGPU: two models placed on one GPU start one
// after the other: the second only once the first's load has ended.
func TestStartsSerialisedPerGPU(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n  b: {vram: 20GiB}\n")
	r.expect("a wanted", func(time.Time) { r.want("a") }, "load_started a", "start a on [0]")
	r.expect("b wanted", func(time.Time) { r.want("b") })
	if st := r.view("b").State; st != Loading {
		t.Fatalf("b is %v, want loading (placed, waiting for the GPU)", st)
	}
	md := r.s.models["a"]
	inst := r.inst("a", 0)
	r.s.started(md, md.loading, inst)
	r.expect("a ready", func(now time.Time) { r.s.loaded(now, md, md.loading, time.Second, nil) },
		append(append([]string{"ready a"}, seq(readyTail, "a", "a")...), "load_started b", "start b on [0]")...)
}

// TestLoadFailureDecisions: a failed load answers its waiters with the
// failure and backs off, doubling; a request during the backoff is told
// the earlier failure at once; the runtime being unreachable is not the
// model's failure and does not double the backoff.
func TestLoadFailureDecisions(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n")
	fail := func(err error) (*waiter, error) {
		w := r.want("a")
		r.flush()
		md := r.s.models["a"]
		r.s.loadFailed(r.now, md, md.loading, err)
		r.flush()
		return w, r.failed(w)
	}
	_, err := fail(fmt.Errorf("create: %w", runtime.PublicError("the image is missing")))
	var le *LoadError
	if !errors.As(err, &le) || le.Retry != BackoffBase || le.Earlier || le.Public() != "model a failed to load: the image is missing" {
		t.Fatalf("first failure: %v (%+v)", err, le)
	}
	r.advance(time.Second)
	if err := r.failed(r.want("a")); !errors.As(err, &le) || !le.Earlier || le.Retry != BackoffBase-time.Second {
		t.Fatalf("during the backoff: %v (%+v), want the earlier failure with 4s to go", err, le)
	}
	r.advance(BackoffBase)
	if _, err := fail(errors.New("boom")); !errors.As(err, &le) || le.Retry != 2*BackoffBase {
		t.Fatalf("second failure: %v, want the backoff doubled", err)
	}
	r.advance(2 * BackoffBase)
	if _, err := fail(fmt.Errorf("create: %w", runtime.ErrUnreachable)); !errors.As(err, &le) || le.Retry != BackoffBase {
		t.Fatalf("runtime away: %v, want the first backoff", err)
	}
	if f := r.s.models["a"].backoff.failures; f != 2 {
		t.Fatalf("%d failures counted, want 2 (the runtime's absence is not one)", f)
	}
	r.advance(BackoffBase)
	md := r.s.models["a"]
	r.expect("an operator's load during a backoff starts at once", func(now time.Time) {
		md.backoff.retryAt = now.Add(time.Hour)
		if err := r.s.load(now, "a", false); err != nil {
			t.Fatal(err)
		}
	}, "load_started a", "start a on [0]")
}

// TestLoadTimeoutIsA504: a load that ran out of time says so.
func TestLoadTimeoutIsA504(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n")
	w := r.want("a")
	md := r.s.models["a"]
	r.s.loadFailed(r.now, md, md.loading, fmt.Errorf("%w 1m0s", ErrLoadTimeout))
	var le *LoadError
	if err := r.failed(w); !errors.As(err, &le) || !le.Timeout() {
		t.Fatalf("%v, want a timeout", err)
	}
}

// TestCrashDecisions: a ready model's server that exits is stopped in the
// View at once; an always_on one is started again.
func TestCrashDecisions(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n  b: {vram: 20GiB, always_on: true}\n")
	r.expect("start", func(now time.Time) { r.s.start(now) }, "load_started b", "start b on [0]")
	b := r.start("b")
	a := r.ready("a")
	r.expect("a crashed", func(now time.Time) { r.s.exited(now, runtime.Exit{ID: a.ID, Code: 1, Reason: "exited"}) },
		"crashed a", "reread GPUs")
	if v := r.view("a"); v.State != Stopped || v.Endpoint != "" {
		t.Fatalf("a after its crash: %+v", v)
	}
	r.expect("b crashed", func(now time.Time) { r.s.exited(now, runtime.Exit{ID: b.ID, Code: 137, Reason: "oom"}) },
		"crashed b", "reread GPUs", "load_started b", "start b on [0]")
}

// TestExitBeforeStartedDecisions: an exit that overtakes the news of its
// server's start ends the load when the start is reported.
func TestExitBeforeStartedDecisions(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n")
	r.want("a")
	r.flush()
	md := r.s.models["a"]
	inst := r.inst("a", 0)
	r.expect("the exit first", func(now time.Time) {
		r.s.exited(now, runtime.Exit{ID: inst.ID, Code: 1, Reason: "exited", LogTail: "CUDA OOM"})
	})
	r.expect("then the start", func(time.Time) { r.s.started(md, md.loading, inst) }, "cancel a load")
	if md.loading.exit == nil || md.loading.exit.LogTail != "CUDA OOM" {
		t.Fatalf("the load does not carry the exit: %+v", md.loading.exit)
	}
}

// TestIdleDecisions: a ready model idle for inactivity_timeout is
// unloaded; a pinned or always-on one is not; one with a request in
// flight is not.
func TestIdleDecisions(t *testing.T) {
	const cfg = "inactivity_timeout: 10m\nmodels:\n  a: {vram: 20GiB}\n  p: {vram: 20GiB}\n  busy: {vram: 20GiB}\n"
	r := newRig(t, strings.Replace(schedConfig, "inactivity_timeout: 0s\n", "", 1)+cfg)
	r.ready("a")
	r.ready("p")
	r.ready("busy")
	if err := r.s.pin("p", true); err != nil {
		t.Fatal(err)
	}
	l := r.answered(r.want("busy"))
	r.advance(9 * time.Minute)
	r.expect("before the timeout", func(now time.Time) { r.s.tick(now) })
	r.advance(time.Minute)
	r.expect("at the timeout", func(now time.Time) { r.s.tick(now) }, "draining a", "stop a within 2s")
	l.Release()
}

// TestDrainDecisions: a draining model stops once its last request ends,
// or at drain_timeout.
func TestDrainDecisions(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n")
	r.ready("a")
	l := r.answered(r.want("a"))
	r.expect("unloaded", func(now time.Time) {
		if err := r.s.unloadAsked(now, "a"); err != nil {
			t.Fatal(err)
		}
		// Published before the count was read, not only once the
		// scheduler's turn ends: see Manager.TryLease.
		if st := r.b.view().Model("a").State; st != Draining {
			t.Fatalf("a is %v in the View as the scheduler reads its count, want draining", st)
		}
	}, "draining a")
	if _, ok := (&Manager{board: r.b}).TryLease("a"); ok {
		t.Fatal("leased a draining model")
	}
	r.expect("still in flight", func(now time.Time) { r.s.reconcile(now) })
	l.Release()
	if len(r.b.bell) != 1 {
		t.Fatal("the last request of a draining model did not ring the loop")
	}
	r.expect("idle", func(now time.Time) { r.s.reconcile(now) }, "stop a within 2s")

	r = newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n")
	r.ready("a")
	r.answered(r.want("a")) // never given back
	r.s.unloadAsked(r.now, "a")
	r.flush()
	r.advance(2 * time.Second)
	r.expect("at drain_timeout", func(now time.Time) { r.s.tick(now) }, "stop a within 2s")
}

// TestUnloadWhileLoadingDecisions: an unload cancels a load under way;
// its waiters are told it was unloaded, and no backoff follows.
func TestUnloadWhileLoadingDecisions(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n")
	w := r.want("a")
	r.flush()
	r.expect("unload", func(now time.Time) { r.s.unloadAsked(now, "a") }, "cancel a load")
	md := r.s.models["a"]
	r.expect("the load ends", func(now time.Time) { r.s.loadFailed(now, md, md.loading, errors.New("context canceled")) },
		"reread GPUs", "unloaded a")
	if err := r.failed(w); !errors.Is(err, ErrUnloaded) {
		t.Fatalf("%v, want ErrUnloaded", err)
	}
	if !md.backoff.retryAt.IsZero() {
		t.Fatal("a cancelled load backs off")
	}
}

// TestConfigDecisions: a model removed from the config is answered 404
// and unloaded once idle, then forgotten; a model whose settings changed
// is reloaded once idle; a new always_on model is loaded at once. Starts
// and stops on one GPU take turns.
func TestConfigDecisions(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n  b: {vram: 20GiB, max_model_len: 4096}\n")
	r.ready("a")
	r.ready("b")
	l := r.answered(r.want("a"))
	next := managertest.Config(t, schedConfig+"models:\n  b: {vram: 20GiB, max_model_len: 8192}\n  c: {vram: 20GiB, always_on: true}\n")
	r.expect("reload", func(now time.Time) { r.s.configure(now, next) }, "load_started c", "start c on [0]")
	if v := r.view("a"); !v.Removed {
		t.Fatalf("a after the reload: %+v", v)
	}
	if err := r.failed(r.want("a")); !errors.Is(err, ErrUnknownModel) {
		t.Fatalf("a request for a removed model: %v", err)
	}
	r.expect("tick: b's settings changed; c's start holds the GPU", func(now time.Time) { r.s.tick(now) }, "draining b")
	r.start("c")
	l.Release()
	r.expect("tick: a idle", func(now time.Time) { r.s.tick(now) }, "draining a", "stop a within 2s")
	r.expect("a stopped: b's turn at once", func(now time.Time) { r.s.stopped(now, r.s.models["a"], []int{0}, nil) },
		"reread GPUs", "unloaded a", "stop b within 2s")
	if r.b.view().Model("a") != nil {
		t.Fatal("a removed and stopped is still in the View")
	}
}

// TestProbeDecisions: a ready model is probed every probe_interval; after
// probe_failures failures in a row it is drained, stopped without grace
// and started again; a probe that passes resets the count.
func TestProbeDecisions(t *testing.T) {
	r := newRig(t, strings.Replace(schedConfig, "probe_interval: 0s\n", "", 1)+"probe_interval: 10s\nprobe_timeout: 1s\nprobe_failures: 2\nmodels:\n  a: {vram: 20GiB}\n")
	inst := r.ready("a")
	md := r.s.models["a"]
	r.expect("not yet due", func(now time.Time) { r.s.tick(now) })
	r.advance(10 * time.Second)
	r.expect("due", func(now time.Time) { r.s.tick(now) }, "probe a")
	r.expect("probing: no second probe", func(now time.Time) { r.s.tick(now) })
	r.expect("fails once", func(now time.Time) { r.s.probed(now, md, inst, errors.New("no answer")) })
	r.advance(10 * time.Second)
	r.s.tick(r.now)
	r.flush()
	r.expect("passes", func(now time.Time) { r.s.probed(now, md, inst, nil) })
	for range 2 {
		r.advance(10 * time.Second)
		r.s.tick(r.now)
		r.flush()
		if md.state != Ready {
			break
		}
		r.at(func(now time.Time) { r.s.probed(now, md, inst, errors.New("no answer")) })
	}
	if v := r.view("a"); v.State != Draining || !strings.Contains(v.LastError, "2 health probes") {
		t.Fatalf("after two failures in a row: %+v", v)
	}
	r.expect("stopped", func(now time.Time) { r.s.stopped(now, md, []int{0}, nil) },
		"reread GPUs", "unloaded a", "load_started a", "start a on [0]")
}

// TestAdoptDecisions: a server found running with the configured launch
// settings is waited for as a load; one with other settings, or of no
// configured model, is stopped.
func TestAdoptDecisions(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n  b: {vram: 20GiB}\n")
	a := r.inst("a", 0)
	b := r.inst("b", 0)
	b.Launch = "other"
	x := &runtime.Instance{ID: "x", Model: "gone", Addr: "10.0.0.9:8000"}
	r.expect("adopt", func(time.Time) { r.s.adopted([]*runtime.Instance{a, b, x}) },
		"resume "+a.ID, "stop stray "+b.ID, "stop stray x")
	if v := r.view("a"); v.State != Loading || v.Instance != a.ID {
		t.Fatalf("a adopted: %+v", v)
	}
}

// TestMeasuredDecisions: a footprint measured from the server's own
// processes is saved; one measured by difference only when no other
// start or stop touched its GPUs.
func TestMeasuredDecisions(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n  b: {vram: 20GiB}\n")
	w := r.want("a")
	r.flush()
	op := r.s.models["a"].loading
	r.start("a")
	r.answered(w).Release()
	fp := Footprint{PerGPU: 18 << 30, How: "delta"}
	r.expect("calm", func(time.Time) { r.s.measured("a", op, fp) }, "save a 18.0GiB delta")
	r.want("b")
	r.flush()
	r.expect("b started on the GPU since", func(time.Time) { r.s.measured("a", op, fp) })
	fp.How = "processes"
	r.expect("by processes", func(time.Time) { r.s.measured("a", op, fp) }, "save a 18.0GiB processes")
}

// TestViewVersions: every change publishes a new View and closes the old
// one's Changed channel; nothing changed, nothing published.
func TestViewVersions(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n")
	v1 := r.b.view()
	r.s.tick(r.now)
	r.flush()
	if r.b.view() != v1 {
		t.Fatal("a tick that changed nothing published a View")
	}
	r.want("a")
	r.flush()
	v2 := r.b.view()
	if v2.Version <= v1.Version {
		t.Fatalf("version %d after %d", v2.Version, v1.Version)
	}
	select {
	case <-v1.Changed():
	default:
		t.Fatal("the old View's Changed is not closed")
	}
	select {
	case <-v2.Changed():
		t.Fatal("the latest View's Changed is closed")
	default:
	}
}

// TestJustReadyIsBusy: the requests that waited for a model are counted in
// as it becomes ready, so a request for another model that needs its room
// cannot evict it before they have run (no ping-pong between two models
// that cannot share the GPU).
func TestJustReadyIsBusy(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 60GiB}\n  b: {vram: 60GiB}\n")
	w := r.want("a")
	r.flush()
	r.start("a")
	r.expect("b wanted while a's waiter holds it", func(time.Time) { r.want("b") })
	r.answered(w).Release()
	r.expect("a idle: evicted for b", func(now time.Time) { r.s.reconcile(now) }, "evicted a", "draining a", "stop a within 2s")
}

// TestRemovedWhileLoadingDecisions: a model that leaves the config while
// it loads has its load cancelled and its waiters told it is gone; if it
// comes back before that load has ended, a request made meanwhile waits
// for a new load rather than failing.
func TestRemovedWhileLoadingDecisions(t *testing.T) {
	const both = "models:\n  a: {vram: 20GiB}\n  b: {vram: 20GiB}\n"
	r := newRig(t, schedConfig+both)
	first := r.want("a")
	r.flush()
	md, op := r.loading("a")
	r.expect("a removed", func(now time.Time) {
		r.s.configure(now, managertest.Config(t, schedConfig+"models:\n  b: {vram: 20GiB}\n"))
	}, "cancel a load")
	if err := r.failed(first); !errors.Is(err, ErrUnknownModel) {
		t.Fatalf("the removed model's waiter: %v", err)
	}
	r.expect("a back", func(now time.Time) { r.s.configure(now, managertest.Config(t, schedConfig+both)) })
	second := r.want("a")
	r.flush()
	r.expect("the old load ends", func(now time.Time) { r.s.loadFailed(now, md, op, errors.New("context canceled")) },
		"reread GPUs", "unloaded a", "load_started a", "start a on [0]")
	unanswered(t, second)
	r.start("a")
	r.answered(second).Release()
}

// TestExternalMemoryDecisions: memory a GPU shows in use that no model of
// vgw's accounts for (someone else's job) is left alone: the model goes
// to the GPU that has room.
func TestExternalMemoryDecisions(t *testing.T) {
	r := newRig(t, schedConfig+"  - {name: sim1, memory: 80GiB}\nmodels:\n  a: {vram: 40GiB}\n")
	r.s.gpusRead(r.now, &gpuReading{mem: []gpu.Memory{{Used: 60 << 30, Total: 80 << 30}, {Total: 80 << 30}}})
	r.flush()
	r.expect("a wanted", func(time.Time) { r.want("a") }, "load_started a", "start a on [1]")
	if v := r.b.view().GPUs[0]; v.Used != 60<<30 {
		t.Fatalf("the View's reading of GPU 0: %+v", v)
	}
}

// TestLoadingAttributedByProcess: a loading model's server, once the
// driver lists its process, is counted once: as its own memory, not also
// as memory someone else uses, so a model beside it still fits.
func TestLoadingAttributedByProcess(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  big: {vram: 50GiB}\n  small: {vram: 20GiB}\n")
	r.want("big")
	r.flush()
	md := r.s.models["big"]
	inst := r.inst("big", 0)
	inst.PIDs = []int{42}
	r.s.started(md, md.loading, inst)
	r.s.gpusRead(r.now, &gpuReading{mem: []gpu.Memory{{Used: 50 << 30, Total: 80 << 30}}, procs: []gpu.Process{{PID: 42, GPU: 0, Used: 50 << 30}}})
	r.flush()
	r.want("small")
	r.flush()
	if st := r.view("small").State; st != Loading {
		t.Fatalf("small is %v: big's memory was counted twice", st)
	}
}

// TestAlwaysOnRetriedAfterBackoff: an always_on model whose load failed
// is started again once its backoff has passed, with no request asking.
func TestAlwaysOnRetriedAfterBackoff(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB, always_on: true}\n")
	r.s.start(r.now)
	r.flush()
	md := r.s.models["a"]
	r.s.loadFailed(r.now, md, md.loading, errors.New("boom"))
	r.flush()
	r.advance(BackoffBase - time.Millisecond)
	r.expect("within the backoff", func(now time.Time) { r.s.tick(now) })
	r.advance(time.Millisecond)
	r.expect("after it", func(now time.Time) { r.s.tick(now) }, "load_started a", "start a on [0]")
}

// TestReloadedModelStaysDecisions: after its settings changed and it
// reloaded, a model's new server is not unloaded again.
func TestReloadedModelStaysDecisions(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB, max_model_len: 4096}\n")
	r.ready("a")
	r.s.configure(r.now, managertest.Config(t, schedConfig+"models:\n  a: {vram: 20GiB, max_model_len: 8192}\n"))
	r.expect("stale and idle", func(now time.Time) { r.s.tick(now) }, "draining a", "stop a within 2s")
	r.s.stopped(r.now, r.s.models["a"], []int{0}, nil)
	r.flush()
	r.ready("a")
	for range 10 {
		r.advance(250 * time.Millisecond)
		r.expect("ticks after the reload", func(now time.Time) { r.s.tick(now) })
	}
}

// TestOperatorLoadDecisions: an operator's load without wait places the
// model though no request waits, and holds it until load_timeout; an
// unknown model is refused.
func TestOperatorLoadDecisions(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n")
	r.expect("load a", func(now time.Time) {
		if err := r.s.load(now, "a", false); err != nil {
			t.Fatal(err)
		}
	}, "load_started a", "start a on [0]")
	if err := r.s.load(r.now, "nope", false); !errors.Is(err, ErrUnknownModel) {
		t.Fatalf("loading an unknown model: %v", err)
	}
	r.start("a")
	if v := r.view("a"); v.State != Ready || v.InFlight() != 0 {
		t.Fatalf("a after the operator's load: %+v", v)
	}
}

// TestUnloadWinsOverUnhealthyRestart: an operator's unload of a model
// being drained for a restart (it failed its probes) keeps it stopped.
func TestUnloadWinsOverUnhealthyRestart(t *testing.T) {
	r := newRig(t, strings.Replace(schedConfig, "probe_interval: 0s\n", "", 1)+"probe_interval: 10s\nprobe_timeout: 1s\nprobe_failures: 1\nmodels:\n  a: {vram: 20GiB}\n")
	inst := r.ready("a")
	md := r.s.models["a"]
	l := r.answered(r.want("a")) // keeps it draining
	r.advance(10 * time.Second)
	r.s.tick(r.now)
	r.flush()
	r.expect("unhealthy", func(now time.Time) { r.s.probed(now, md, inst, errors.New("no answer")) }, "unhealthy a", "draining a")
	r.s.unloadAsked(r.now, "a")
	r.flush()
	l.Release()
	r.expect("idle", func(now time.Time) { r.s.reconcile(now) }, "stop a within 0s")
	r.expect("stopped", func(now time.Time) { r.s.stopped(now, md, []int{0}, nil) }, "reread GPUs", "unloaded a")
}

// TestUnhealthyAgainBacksOff: a model that fails its probes again before
// it ever passed one is restarted only after a backoff.
func TestUnhealthyAgainBacksOff(t *testing.T) {
	r := newRig(t, strings.Replace(schedConfig, "probe_interval: 0s\n", "", 1)+"probe_interval: 10s\nprobe_timeout: 1s\nprobe_failures: 1\nmodels:\n  a: {vram: 20GiB}\n")
	md := r.s.models["a"]
	hang := func() {
		inst := md.inst
		r.advance(10 * time.Second)
		r.s.tick(r.now)
		r.flush()
		r.s.probed(r.now, md, inst, errors.New("no answer"))
		r.flush()
		r.s.stopped(r.now, md, []int{0}, nil)
	}
	r.ready("a")
	hang()
	if acts := r.at(func(time.Time) {}); !slices.Contains(acts, "start a on [0]") {
		t.Fatalf("first hang: %q, want a restart at once", acts)
	}
	r.start("a")
	hang()
	if acts := r.at(func(time.Time) {}); slices.Contains(acts, "start a on [0]") {
		t.Fatalf("second hang in a row: %q, want a backoff first", acts)
	}
	r.advance(BackoffBase)
	r.expect("after the backoff", func(now time.Time) { r.s.tick(now) }, "load_started a", "start a on [0]")
}

// TestLoadAsStrictAsProbes: a load's health checks have the probe's
// timeout when the model is probed once ready, else a default.
func TestLoadAsStrictAsProbes(t *testing.T) {
	r := newRig(t, strings.Replace(schedConfig, "probe_interval: 0s\n", "", 1)+"probe_interval: 10s\nprobe_timeout: 300ms\nmodels:\n  a: {vram: 20GiB}\n  b: {vram: 20GiB, probe_interval: 0s}\n")
	r.want("a")
	r.want("b")
	r.flush()
	if p := r.s.models["a"].loading.poll; p != 300*time.Millisecond {
		t.Fatalf("a's load polls within %v, want its probe_timeout", p)
	}
	if p := r.s.newLoadOp(r.s.models["b"]).poll; p != defaultPoll {
		t.Fatalf("b's load polls within %v, want %v: it is not probed", p, defaultPoll)
	}
}

// TestExitBeforeLoadedDecisions: a server whose exit is taken before the
// news that it answered its health check is not made ready: its load fails
// with the exit, and nobody is leased a dead server.
func TestExitBeforeLoadedDecisions(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n")
	w := r.want("a")
	r.flush()
	md, op := r.loading("a")
	inst := r.inst("a", 0)
	r.s.started(md, op, inst)
	r.flush()
	// The exit comes first (random select between m.cmds and Exits()).
	r.s.exited(r.now, runtime.Exit{ID: inst.ID, Code: 1, Reason: "exited", LogTail: "CUDA error"})
	r.flush()
	// Then the loaded the worker queued before the exit was seen.
	r.s.loaded(r.now, md, op, time.Second, nil)
	r.flush()
	if v := r.view("a"); v.State == Ready {
		t.Errorf("a is Ready at %s, whose server has exited; no further exit will come", v.Endpoint)
	}
	select {
	case rep := <-w.reply:
		if rep.err == nil {
			t.Errorf("the waiter got a lease on a dead server at %s", rep.m.Endpoint)
		}
	default:
	}
	// Nothing will ever notice: no probe (probe_interval 0s), no exit.
	for range 5 {
		r.advance(time.Minute)
		r.s.tick(r.now)
		r.flush()
	}
	if v := r.view("a"); v.State == Ready {
		t.Errorf("five minutes later a is still Ready at the dead %s", v.Endpoint)
	}
}

// TestLateAdoptLeavesOwnStart: servers listed for adoption while the
// model's own start is under way (a listing retried once the runtime is
// back) are left alone, not stopped as strays.
func TestLateAdoptLeavesOwnStart(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB}\n")
	w := r.want("a")
	r.flush()
	md, op := r.loading("a")
	inst := r.inst("a", 0) // what rt.Start is creating right now
	got := r.at(func(time.Time) { r.s.adopted([]*runtime.Instance{inst}) })
	for _, a := range got {
		if a == "stop stray "+inst.ID {
			t.Errorf("adopted stops the server a's own load is starting: %q", got)
		}
	}
	r.s.started(md, op, inst)
	r.flush()
	if md.loading != op || md.inst != inst {
		t.Errorf("a's own load was disturbed: loading %v, instance %v", md.loading, md.inst)
	}
	unanswered(t, w)
}

// TestAdoptedAlwaysOnNotPlacedAgain: an always_on model queued again after
// a failed start, then adopted once the runtime is back, is not placed a
// second time when its backoff ends.
func TestAdoptedAlwaysOnNotPlacedAgain(t *testing.T) {
	r := newRig(t, schedConfig+"models:\n  a: {vram: 20GiB, always_on: true}\n")
	r.expect("start", func(now time.Time) { r.s.start(now) }, "load_started a", "start a on [0]")
	md := r.s.models["a"]
	r.s.loadFailed(r.now, md, md.loading, fmt.Errorf("create: %w", runtime.ErrUnreachable))
	r.flush()
	old := r.inst("a", 0) // the previous vgw's server, found once Docker is back
	r.advance(time.Second)
	r.expect("retried adopt", func(now time.Time) { r.s.adopted([]*runtime.Instance{old}); r.s.schedule(now) }, "resume "+old.ID)
	r.s.loaded(r.now, md, md.loading, time.Second, nil)
	r.flush()
	if st := r.view("a").State; st != Ready {
		t.Fatalf("a adopted: %v", st)
	}
	r.advance(BackoffBase)
	r.at(func(now time.Time) { r.s.tick(now) })
	v := r.view("a")
	if v.State != Ready {
		t.Errorf("a, adopted and ready, is now %v (endpoint %q, loading op %v)", v.State, v.Endpoint, md.loading != nil)
	}
	w := r.want("a")
	r.flush()
	select {
	case rep := <-w.reply:
		if rep.err == nil {
			rep.m.use.release("a")
		}
	default:
		r.advance(time.Hour)
		r.s.tick(r.now)
		r.flush()
		if len(w.reply) == 0 {
			t.Errorf("a request for a is never answered: state %v, loading %v, inst %v", md.state, md.loading != nil, md.inst != nil)
		}
	}
}

// TestReaddedLoadSucceeds: a load cancelled as its model left the config,
// which it came back to, and that then succeeds, serves: the model stays
// ready and the request made meanwhile gets a usable lease.
func TestReaddedLoadSucceeds(t *testing.T) {
	const both = "models:\n  a: {vram: 20GiB}\n  b: {vram: 20GiB}\n"
	r := newRig(t, schedConfig+both)
	r.want("a")
	r.flush()
	md, op := r.loading("a")
	inst := r.inst("a", 0)
	r.s.started(md, op, inst)
	r.flush()
	r.expect("a removed", func(now time.Time) {
		r.s.configure(now, managertest.Config(t, schedConfig+"models:\n  b: {vram: 20GiB}\n"))
	}, "cancel a load")
	r.expect("a back", func(now time.Time) { r.s.configure(now, managertest.Config(t, schedConfig+both)) })
	second := r.want("a")
	r.flush()
	// The worker saw /health answer before the cancel: loaded, not loadFailed.
	r.s.loaded(r.now, md, op, time.Second, nil)
	r.flush()
	select {
	case rep := <-second.reply:
		if rep.err == nil && rep.m.Endpoint == "" {
			t.Errorf("the request made after a came back got a lease with no endpoint (state %v)", rep.m.State)
		}
		if rep.err != nil {
			t.Errorf("the request made after a came back failed: %v", rep.err)
		}
	default:
	}
	if st := r.view("a").State; st != Ready {
		t.Errorf("a, configured again and wanted, is %v", st)
	}
}
