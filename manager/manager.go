// Package manager decides which models are resident on which GPUs, and
// starts, stops and swaps their servers through a Runtime, within the
// GPUs' memory as an Inventory reads it.
//
// One goroutine, the loop, owns all model state; everything else talks to
// it through a channel of closures, and slow work (starting, health
// polling, stopping, measuring) runs on worker goroutines that post their
// results back. The request path does not go through the loop: Acquire and
// Release use per-model atomics, so a resident model costs two atomic adds
// per request. Placement (Place) is a pure function of a state snapshot.
package manager

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync/atomic"
	"time"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/manager/gpu"
	"github.com/vgw-project/vgw/manager/runtime"
)

// State is where a model stands.
type State int32

const (
	Stopped  State = iota // not resident
	Loading               // placed; its server is starting (or waiting for room)
	Ready                 // serving
	Draining              // being unloaded: finishing requests, then stopping
)

var stateNames = [...]string{"stopped", "loading", "ready", "draining"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "unknown"
}

// Errors callers tell apart.
var (
	ErrUnknownModel = errors.New("model is not configured")
	ErrClosed       = errors.New("the GPU manager has stopped")
	// ErrLoadTimeout: the model's server was not healthy within its
	// load_timeout.
	ErrLoadTimeout = errors.New("not healthy within load_timeout")
)

// LoadError says why a model failed to load and when it is tried again.
type LoadError struct {
	Model   string
	Err     error
	LogTail string
	Retry   time.Duration
	// Earlier says the failure is an earlier load's, repeated to a request
	// that arrived while the model backs off: that request waited for
	// nothing.
	Earlier bool
}

func (e *LoadError) Error() string {
	msg := fmt.Sprintf("model %s failed to load: %v", e.Model, e.Err)
	if e.LogTail != "" {
		msg += "; last log lines: " + lastLines(e.LogTail, 5)
	}
	return msg
}

// Public is what a client of the model is told: the kind of failure, in
// words vgw chose. The whole cause (the server's log lines, the Docker
// daemon's address, paths) is the operator's to read in status, events
// and vgw's log, not every API caller's.
func (e *LoadError) Public() string {
	return fmt.Sprintf("model %s failed to load: %s", e.Model, publicCause(e.Err))
}

// publicCause is the kind of failure: how the server exited, the load
// timeout, or what the runtime's error says clients may be told (see
// runtime.PublicError), else that the server could not be started.
func publicCause(err error) string {
	var exit *exitError
	if errors.As(err, &exit) {
		return exit.Error() // how it exited: no log
	}
	if errors.Is(err, ErrLoadTimeout) {
		return ErrLoadTimeout.Error()
	}
	var p interface{ Public() string }
	if errors.As(err, &p) {
		return p.Public()
	}
	return "its server could not be started"
}

func (e *LoadError) Unwrap() error { return e.Err }

// Timeout reports whether the load failed by running out of time, which
// its waiters are told as a 504, not a 503.
func (e *LoadError) Timeout() bool { return !e.Earlier && errors.Is(e.Err, ErrLoadTimeout) }

// RetryAfter is when the next load of the model may be tried.
func (e *LoadError) RetryAfter() time.Duration { return e.Retry }

// RetryAfter suggests when a placement that found no room may succeed.
func (e *NoRoom) RetryAfter() time.Duration { return 30 * time.Second }

// Event is a lifecycle change worth telling an operator about.
type Event struct {
	Time   time.Time
	Model  string
	Kind   string // one of EventKinds
	Detail string
	// Took is how long a load took, for a ready event.
	Took time.Duration
}

// The kinds of Event.
const (
	EventLoadStarted = "load_started"
	EventReady       = "ready"
	EventLoadFailed  = "load_failed"
	EventEvicted     = "evicted"
	EventDraining    = "draining"
	EventCrashed     = "crashed"
	EventUnloaded    = "unloaded"
	// EventUnhealthy: a ready model's server failed probe_failures health
	// probes in a row; it is taken out of service and restarted.
	EventUnhealthy = "unhealthy"
)

// EventKinds lists every kind of Event, for those who count them.
var EventKinds = []string{EventLoadStarted, EventReady, EventLoadFailed, EventEvicted, EventDraining, EventCrashed, EventUnloaded, EventUnhealthy}

// Options are a Manager's optional settings.
type Options struct {
	Log        *slog.Logger
	Footprints *Footprints
	// OnEvent receives lifecycle events from the loop; it must not block.
	OnEvent func(Event)
	// Tick is how often the loop checks timeouts and retries placement.
	Tick time.Duration
	// GPUPoll is how often GPU memory is read.
	GPUPoll time.Duration
	// Backoff is the wait after a first failed load; it doubles with each
	// failure in a row, up to BackoffMax. Default BackoffBase.
	Backoff time.Duration
}

// Manager runs models on GPUs.
type Manager struct {
	rt   Runtime
	inv  Inventory
	fps  *Footprints
	log  *slog.Logger
	opts Options

	cmds    chan func()
	poke    chan struct{}
	reread  chan struct{} // asks the GPU watcher to read now
	closed  chan struct{}
	handles atomic.Pointer[map[string]*handle]
	coarse  atomic.Int64 // unix nanos, refreshed every tick: a clock the request path can afford
	reading atomic.Pointer[gpuReading]
	health  *http.Client

	// Owned by the loop.
	ctx     context.Context
	cfg     *config.Config
	gpus    []gpu.GPU
	models  map[string]*model
	gpuBusy map[int]string // GPU → model whose server is starting or stopping on it
	pending []*model       // models wanted but not yet placed, oldest first
	// quiesced stops always_on models from coming back, after StopAll.
	quiesced bool
	// orphans are exits of servers not (yet) known to be a model's: an exit
	// can overtake the news that its server started.
	orphans []runtime.Exit
	// gpuOps counts the starts and stops on each GPU, and lastStop is when
	// the last stop on it ended, for judging a measurement by difference.
	gpuOps   map[int]int
	lastStop map[int]time.Time
}

// handle is what the request path reads and writes without the loop.
type handle struct {
	removed  atomic.Bool // gone from the config: no new requests
	state    atomic.Int32
	inflight atomic.Int64
	lastUsed atomic.Int64 // unix nanos
	addr     atomic.Pointer[string]
}

// model is the loop's record of one model.
type model struct {
	name      string
	h         *handle
	cfg       *config.Model
	sig       string   // of the config in force: the memory settings, for footprints
	launch    string   // of the config in force; inst.Launch is what runs
	pids      instPIDs // inst's processes, found once it was ready
	inst      *runtime.Instance
	gpus      []int
	perGPU    uint64
	source    string // where perGPU came from: declared, learned, utilization, default
	since     time.Time
	loading   *loadOp // the load worker in progress, if any
	waiters   []*waiter
	evicting  []string // models to be gone before this one starts
	failures  int
	retryAt   time.Time
	lastErr   error      // why the last load failed, or why it cannot be placed
	lastLoad  *LoadError // the last failed load, answered again during its backoff
	drainBy   time.Time
	removed   bool      // gone from the config: unload once idle
	keepUntil time.Time // an operator asked to load it: placed though no request waits, until then
	pinned    bool
	stopping  bool // a stop is under way
	// Health probes of a ready server (probe.go): one at a time, the next
	// due at nextProbe; probeFailures counts failures in a row, and
	// unhealthy says the server failed enough of them to be stopped
	// without grace, and restart that it is started again once stopped
	// (an operator's unload takes that back).
	probing       bool
	nextProbe     time.Time
	probeFailures int
	unhealthy     bool
	restart       bool
}

// loadOp is one run of a load worker. The GPUs it claims stay claimed until
// the worker has finished, its server stopped if the load failed, so no
// other start or stop overlaps it on those GPUs.
type loadOp struct {
	ctx    context.Context // ends at load_timeout, or when cancelled
	cancel context.CancelFunc
	limit  time.Duration // load_timeout
	// poll bounds one health check: the model's probe_timeout when it is
	// probed once ready, so that a server is ready by the same measure
	// its probes then hold it to (one answering slower would be restarted
	// as soon as it was ready, again and again).
	poll      time.Duration
	gpus      []int
	exit      *runtime.Exit // the server exited during the load
	cancelled bool          // unloaded while loading: no backoff
	readded   bool          // cancelled as its model left the config, which it came back to
	ops       map[int]int
	calm      bool // no stop on its GPUs just before it started
	adopted   bool // a server a previous vgw started, waited for as a load
}

// instPIDs are an instance's processes as the runtime listed them.
type instPIDs struct {
	inst *runtime.Instance
	pids []int
}

// serverPIDs are the processes of md's server: as listed once it was
// ready (vLLM's engine and workers included), else the one it started as.
func (md *model) serverPIDs() []int {
	if md.inst == nil {
		return nil
	}
	if md.pids.inst == md.inst {
		return md.pids.pids
	}
	return md.inst.PIDs
}

// stale says md's server runs settings that are no longer configured.
func (md *model) stale() bool { return md.inst != nil && md.inst.Launch != md.launch }

func (md *model) state() State { return State(md.h.state.Load()) }

func (md *model) setState(s State) { md.h.state.Store(int32(s)) }

// waiter is one Ensure call waiting for a model. Exactly one of the loop
// (answering) and the caller (giving up) wins its state; an answer of nil
// means the loop has counted the request in, as Acquire does, so a model
// that just became ready is busy, not idle, until its waiters' requests end.
type waiter struct {
	reply   chan error
	state   atomic.Int32          // waiting, answered, gone
	lastErr atomic.Pointer[error] // why it could not be placed yet
}

const (
	waiting int32 = iota
	answered
	gone
)

// answer replies to w unless it gave up. For nil it counts the request in.
func (w *waiter) answer(h *handle, err error) {
	if !w.state.CompareAndSwap(waiting, answered) {
		return
	}
	if err == nil {
		h.inflight.Add(1)
	}
	w.reply <- err
}

type gpuReading struct {
	mem   []gpu.Memory
	procs []gpu.Process
}

// New returns a manager for cfg's models; Run starts it.
func New(cfg *config.Config, rt Runtime, inv Inventory, opts Options) *Manager {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Footprints == nil {
		opts.Footprints, _ = OpenFootprints("")
	}
	if opts.OnEvent == nil {
		opts.OnEvent = func(Event) {}
	}
	if opts.Tick == 0 {
		opts.Tick = 250 * time.Millisecond
	}
	if opts.GPUPoll == 0 {
		opts.GPUPoll = 500 * time.Millisecond
	}
	if opts.Backoff == 0 {
		opts.Backoff = BackoffBase
	}
	m := &Manager{
		rt: rt, inv: inv, fps: opts.Footprints, log: opts.Log, opts: opts,
		cmds:     make(chan func(), 256),
		poke:     make(chan struct{}, 1),
		reread:   make(chan struct{}, 1),
		closed:   make(chan struct{}),
		health:   &http.Client{}, // each check bounds itself (healthy)
		cfg:      cfg,
		gpus:     inv.GPUs(),
		models:   map[string]*model{},
		gpuBusy:  map[int]string{},
		gpuOps:   map[int]int{},
		lastStop: map[int]time.Time{},
	}
	m.coarse.Store(time.Now().UnixNano())
	for _, name := range cfg.ModelNames() {
		m.models[name] = m.newModel(name, cfg.Models[name])
	}
	m.publish()
	return m
}

func (m *Manager) newModel(name string, mc *config.Model) *model {
	md := &model{name: name, h: &handle{}, cfg: mc, sig: Signature(m.cfg, mc), launch: LaunchSignature(m.cfg, mc)}
	md.h.lastUsed.Store(m.coarse.Load())
	return md
}

// publish gives the request path the current set of model handles.
func (m *Manager) publish() {
	hs := make(map[string]*handle, len(m.models))
	for name, md := range m.models {
		hs[name] = md.h
	}
	m.handles.Store(&hs)
}

// Run runs the loop until ctx ends. Model servers are left running: a
// Docker runtime adopts them when vgw starts again.
func (m *Manager) Run(ctx context.Context) error {
	defer close(m.closed)
	m.ctx = ctx
	m.readGPUs()
	go m.watchGPUs(ctx)
	m.adopt(ctx)
	for _, md := range m.sorted() {
		if md.cfg.AlwaysOn && md.state() == Stopped {
			m.want(md)
		}
	}
	m.schedule()
	tick := time.NewTicker(m.opts.Tick)
	defer tick.Stop()
	for {
		select {
		case f := <-m.cmds:
			f()
		case e := <-m.rt.Exits():
			m.exited(e)
		case <-m.poke:
			m.reconcile()
		case now := <-tick.C:
			m.coarse.Store(now.UnixNano())
			m.tick(now)
		case <-ctx.Done():
			return nil
		}
	}
}

// do runs f on the loop. It reports false once the manager has stopped.
func (m *Manager) do(f func()) bool {
	select {
	case m.cmds <- f:
		return true
	case <-m.closed:
		return false
	}
}

// doCtx is do that also gives up when ctx ends.
func (m *Manager) doCtx(ctx context.Context, f func()) error {
	select {
	case m.cmds <- f:
		return nil
	case <-m.closed:
		return ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	}
}

// call runs f on the loop and waits for it.
func (m *Manager) call(f func()) bool {
	done := make(chan struct{})
	if !m.do(func() { f(); close(done) }) {
		return false
	}
	select {
	case <-done:
		return true
	case <-m.closed:
		return false
	}
}

// rereadGPUs asks the GPU watcher for a fresh reading, without blocking:
// after a server stops, its memory shows free as soon as the driver says.
func (m *Manager) rereadGPUs() {
	select {
	case m.reread <- struct{}{}:
	default:
	}
}

// pokeLoop asks the loop to look again, without blocking.
func (m *Manager) pokeLoop() {
	select {
	case m.poke <- struct{}{}:
	default:
	}
}

func (m *Manager) handle(name string) *handle { return (*m.handles.Load())[name] }

// Acquire counts a request for model in and reports whether the model is
// ready to serve it. Every true must be matched by one Release. It is the
// request path's whole cost: two atomic operations and a store.
//
// The order of its steps pairs with the loop's when it unloads a model:
// Acquire counts first and then checks the state, the loop sets the state
// first and then reads the count, so a request either sees the model
// draining or is seen in flight, never neither.
func (m *Manager) Acquire(name string) bool {
	h := m.handle(name)
	if h == nil || h.removed.Load() {
		return false
	}
	h.inflight.Add(1)
	if State(h.state.Load()) != Ready {
		m.release(h)
		return false
	}
	h.lastUsed.Store(m.coarse.Load())
	return true
}

// Release counts a request out.
func (m *Manager) Release(name string) {
	if h := m.handle(name); h != nil {
		h.lastUsed.Store(m.coarse.Load())
		m.release(h)
	}
}

func (m *Manager) release(h *handle) {
	if h.inflight.Add(-1) == 0 && State(h.state.Load()) == Draining {
		m.pokeLoop()
	}
}

// Endpoint returns where a ready model serves.
func (m *Manager) Endpoint(name string) (string, bool) {
	h := m.handle(name)
	if h == nil || State(h.state.Load()) != Ready {
		return "", false
	}
	a := h.addr.Load()
	if a == nil {
		return "", false
	}
	return *a, true
}

// Ensure returns once model is ready and counted in (as Acquire), loading
// it, and evicting others, if need be. It waits while the model loads, and
// while no GPU has room, until ctx ends. When ctx's deadline passes while
// the model still could not be placed, it returns the *NoRoom diagnostic
// rather than the deadline.
func (m *Manager) Ensure(ctx context.Context, name string) error {
	if m.Acquire(name) {
		return nil
	}
	w := &waiter{reply: make(chan error, 1)}
	if err := m.doCtx(ctx, func() { m.ensure(name, w) }); err != nil {
		return err
	}
	select {
	case err := <-w.reply:
		return err
	case <-ctx.Done():
		if !w.state.CompareAndSwap(waiting, gone) {
			return <-w.reply // answered as we gave up: take the answer
		}
		if p := w.lastErr.Load(); p != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return *p
		}
		return ctx.Err()
	}
}

// ensure is Ensure's part on the loop.
func (m *Manager) ensure(name string, w *waiter) {
	md := m.models[name]
	if md == nil || md.removed {
		w.answer(nil, fmt.Errorf("%w: %s", ErrUnknownModel, name))
		return
	}
	switch md.state() {
	case Ready:
		w.answer(md.h, nil)
	case Loading, Draining:
		md.waiters = append(md.waiters, w)
	case Stopped:
		if now := time.Now(); now.Before(md.retryAt) && md.lastLoad != nil {
			again := *md.lastLoad
			again.Retry, again.Earlier = md.retryAt.Sub(now), true
			w.answer(md.h, &again)
			return
		}
		md.waiters = append(md.waiters, w)
		m.want(md)
		m.schedule()
	}
}

// want marks md as wanted: it waits in pending until it can be placed.
func (m *Manager) want(md *model) {
	if !slices.Contains(m.pending, md) {
		m.pending = append(m.pending, md)
	}
}

// liveWaiters drops the waiters that gave up.
func (md *model) liveWaiters() []*waiter {
	md.waiters = slices.DeleteFunc(md.waiters, func(w *waiter) bool { return w.state.Load() == gone })
	return md.waiters
}

// answer replies to every waiter of md; nil counts each one in.
func (md *model) answer(err error) {
	for _, w := range md.waiters {
		w.answer(md.h, err)
	}
	md.waiters = nil
}

// schedule places the pending models it can, oldest first.
func (m *Manager) schedule() {
	now := time.Now()
	for _, md := range slices.Clone(m.pending) {
		if len(md.liveWaiters()) == 0 && !m.wanted(md) {
			m.pending = slices.DeleteFunc(m.pending, func(x *model) bool { return x == md })
			continue
		}
		if now.Before(md.retryAt) {
			continue // an always_on model in its backoff: tick comes back
		}
		want := m.want0(md)
		plan, err := Place(m.snapshot(now), want)
		if err != nil && m.impossible(want) {
			// It would not fit on empty GPUs either: waiting cannot help.
			m.pending = slices.DeleteFunc(m.pending, func(x *model) bool { return x == md })
			md.lastErr = err
			md.answer(err)
			continue
		}
		if err != nil {
			var was *NoRoom
			if !errors.As(md.lastErr, &was) {
				m.log.Info("waiting for GPU memory", slog.String("model", md.name), slog.String("why", err.Error()))
			}
			md.lastErr = err
			for _, w := range md.waiters {
				w.lastErr.Store(&err)
			}
			continue
		}
		m.pending = slices.DeleteFunc(m.pending, func(x *model) bool { return x == md })
		md.keepUntil = time.Time{}
		for _, w := range md.waiters {
			w.lastErr.Store(nil)
		}
		m.begin(md, plan)
	}
}

// impossible reports whether w could not be placed even with every GPU
// empty.
func (m *Manager) impossible(w Want) bool {
	s := Snapshot{}
	for _, g := range m.gpus {
		s.GPUs = append(s.GPUs, GPUState{Index: g.Index, Total: g.Total})
	}
	_, err := Place(s, w)
	return err != nil
}

// keepLoaded says md is always on: loaded at start and after a crash.
func (m *Manager) keepLoaded(md *model) bool { return md.cfg.AlwaysOn && !md.removed && !m.quiesced }

// wanted says md should be placed though no request waits for it.
func (m *Manager) wanted(md *model) bool {
	return m.keepLoaded(md) || (time.Now().Before(md.keepUntil) && !md.removed && !m.quiesced)
}

// want0 is the placement request for md: its memory per GPU and GPUs.
func (m *Manager) want0(md *model) Want {
	md.perGPU, md.source = m.need(md)
	return Want{Model: md.name, PerGPU: md.perGPU, TP: max(md.cfg.TensorParallelSize, 1), Allowed: md.cfg.GPUs}
}

// DefaultUtilization is vLLM's own default --gpu-memory-utilization: what a
// model takes of a GPU when nothing says otherwise.
const DefaultUtilization = 0.9

// need is the memory md takes on each of its GPUs: declared, else learned
// under the same settings, else what its utilization takes of a GPU.
func (m *Manager) need(md *model) (uint64, string) {
	tp := uint64(max(md.cfg.TensorParallelSize, 1))
	if md.cfg.VRAM > 0 {
		return uint64(md.cfg.VRAM) / tp, "declared"
	}
	if fp, ok := m.fps.Get(md.name, md.sig); ok {
		return fp.PerGPU, "learned"
	}
	var largest uint64
	for _, g := range m.gpus {
		largest = max(largest, g.Total)
	}
	if u := md.cfg.GPUMemoryUtilization; u > 0 {
		return uint64(u * float64(largest)), "utilization"
	}
	return uint64(DefaultUtilization * float64(largest)), "default"
}

// Update applies a new config. New models can be asked for at once; a
// model that is gone, or whose memory settings changed, is unloaded once
// it is idle (its requests in flight finish on the old server), and the
// next request loads it under the new settings. Limits and timeouts apply
// to the next decision.
func (m *Manager) Update(cfg *config.Config) bool {
	return m.call(func() {
		m.cfg = cfg
		var leaving []*model // loading, and gone from the config
		for name, md := range m.models {
			mc, ok := cfg.Models[name]
			if !ok {
				md.removed = true
				md.h.removed.Store(true)
				md.answer(fmt.Errorf("%w: %s", ErrUnknownModel, name))
				if md.state() == Loading {
					leaving = append(leaving, md)
				}
				m.forget(md)
				continue
			}
			if md.removed && md.loading != nil && md.loading.cancelled {
				md.loading.readded = true
			}
			md.removed = false
			md.h.removed.Store(false)
			md.sig = Signature(cfg, mc)
			md.launch = LaunchSignature(cfg, mc) // a server running other settings is stale: see tick
			md.cfg = mc
			if mc.AlwaysOn && md.state() == Stopped {
				m.want(md)
			}
		}
		for _, name := range cfg.ModelNames() {
			if _, ok := m.models[name]; !ok {
				md := m.newModel(name, cfg.Models[name])
				m.models[name] = md
				if md.cfg.AlwaysOn {
					m.want(md)
				}
			}
		}
		// Nobody can ask for these any more: a load would only hold GPU
		// memory until load_timeout. (A ready model is unloaded once
		// idle, by tick.) Unloaded once every model has its new config.
		for _, md := range leaving {
			m.unload(md, "it was removed from the config")
		}
		m.publish()
		m.schedule()
	})
}

// Pin keeps a model from being evicted or unloaded for idleness (on) or
// lets it go again (off), as an operator asks.
func (m *Manager) Pin(name string, on bool) error {
	return m.onModel(name, false, func(md *model) { md.pinned = on })
}

// onModel runs f on the loop with the model called name, for an
// operator's action. It fails with ErrUnknownModel when there is none (or
// it has left the config, unless removedToo), and with ErrClosed once the
// manager has stopped.
func (m *Manager) onModel(name string, removedToo bool, f func(*model)) error {
	var err error
	ok := m.call(func() {
		md := m.models[name]
		if md == nil || (md.removed && !removedToo) {
			err = fmt.Errorf("%w: %s", ErrUnknownModel, name)
			return
		}
		f(md)
	})
	if !ok {
		return ErrClosed
	}
	return err
}

// Load loads a model as an operator asks, evicting idle ones if need be,
// and at once even during the backoff after a failed load: the operator
// may have fixed the cause. With wait it returns once the model is ready,
// or why it is not, by ctx's end; without, it starts the load and returns,
// and the model is tried until load_timeout as a request's would be.
func (m *Manager) Load(ctx context.Context, name string, wait bool) error {
	err := m.onModel(name, false, func(md *model) {
		md.retryAt = time.Time{}
		if !wait && md.state() == Stopped {
			m.want(md)
			md.keepUntil = time.Now().Add(m.cfg.LoadTimeout.Std())
			m.schedule()
		}
	})
	if err != nil || !wait {
		return err
	}
	if err := m.Ensure(ctx, name); err != nil {
		return err
	}
	m.Release(name)
	return nil
}

// GPUStatus is one GPU with its latest reading.
type GPUStatus struct {
	gpu.GPU
	Used uint64
}

// GPUs reports every GPU and its memory in use at the latest reading.
func (m *Manager) GPUs() []GPUStatus {
	r := m.reading.Load()
	out := make([]GPUStatus, len(m.gpus))
	for i, g := range m.gpus {
		out[i].GPU = g
		if r != nil && g.Index < len(r.mem) {
			out[i].Used = r.mem[g.Index].Used
		}
	}
	return out
}

// ModelStatus is one model as Status reports it.
type ModelStatus struct {
	Name      string
	State     State
	GPUs      []int
	Addr      string
	Instance  string
	PerGPU    uint64
	Footprint string // where PerGPU comes from: declared, learned, utilization, default
	Since     time.Time
	LastUsed  time.Time // zero when never used
	InFlight  int64
	Waiting   int
	AlwaysOn  bool
	Pinned    bool
	LastError string
	RetryAt   time.Time
}

// Status reports every model.
func (m *Manager) Status() []ModelStatus {
	var out []ModelStatus
	m.call(func() {
		for _, md := range m.sorted() {
			st := ModelStatus{
				Name: md.name, State: md.state(), GPUs: slices.Clone(md.gpus), PerGPU: md.perGPU, Footprint: md.source,
				Since: md.since, InFlight: md.h.inflight.Load(),
				Waiting: len(md.liveWaiters()), AlwaysOn: md.cfg.AlwaysOn, Pinned: md.pinned, RetryAt: md.retryAt,
			}
			if t := md.h.lastUsed.Load(); t != 0 {
				st.LastUsed = time.Unix(0, t)
			}
			if md.inst != nil {
				st.Addr, st.Instance = md.inst.Addr, md.inst.ID
			}
			if md.lastErr != nil {
				st.LastError = md.lastErr.Error()
			}
			out = append(out, st)
		}
	})
	return out
}

// Unload drains and stops a model now, as an operator asks.
func (m *Manager) Unload(name string) error {
	return m.onModel(name, true, func(md *model) {
		// An operator's unload wins over a restart an unhealthy model was
		// being drained for.
		md.restart, md.keepUntil = false, time.Time{}
		m.unload(md, "asked to")
	})
}

// StopAll unloads every model and waits until all are stopped or ctx ends.
// vgw does not call it when it exits (a restarted vgw adopts its servers);
// it is for tests and for an operator emptying the GPUs.
func (m *Manager) StopAll(ctx context.Context) error {
	for {
		running := 0
		m.call(func() {
			m.quiesced = true
			m.pending = nil
			for _, md := range m.models {
				md.answer(ErrClosed)
			}
			for _, md := range m.sorted() {
				if md.state() != Stopped {
					running++
					m.unload(md, "stopping all")
				}
			}
		})
		if running == 0 {
			return nil
		}
		select {
		case <-time.After(20 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		case <-m.closed:
			return ErrClosed
		}
	}
}
