// Package manager decides which models are resident on which GPUs, and
// starts, stops and swaps their servers through a Runtime, within the
// GPUs' memory as an Inventory reads it.
//
// It is in two parts. The scheduler decides: it holds every model's state,
// takes events and answers with actions, and does no I/O (scheduler.go).
// The Manager acts: one goroutine, the loop, owns the scheduler and feeds
// it events, carries out its actions, and runs the slow ones (starting,
// health checks, stopping, measuring) on worker goroutines that report
// back as events (executor.go). What the scheduler decides is published
// as an immutable View, which the xDS server, the admin service and the
// request path read without the loop. A request takes a Lease on a model:
// for a ready model that is two atomic adds and two loads, and the lease
// count is the one count of the model's requests.
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

	"github.com/jonboulle/clockwork"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/manager/runtime"
)

// State is where a model stands.
type State int32

const (
	Stopped  State = iota // not resident
	Loading               // placed; its server is starting (or waiting for room)
	Ready                 // serving
	Draining              // being unloaded or put to sleep: finishing requests, then stopping or sleeping
	Sleeping              // its server sleeps: most of its GPU memory given back, woken by the next request
	Waking                // its sleeping server is being woken
	// Failed is Stopped after a load that failed, until one succeeds: a
	// View's state only (the scheduler's is Stopped), so that status,
	// /v1/models and metrics tell it from a model merely not loaded.
	Failed
)

var stateNames = [...]string{"stopped", "loading", "ready", "draining", "sleeping", "waking", "failed"}

// StateNames lists every State by name, for those who show each.
func StateNames() []string { return slices.Clone(stateNames[:]) }

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
		msg += "; last log lines: " + runtime.LastLines(e.LogTail, 5)
	}
	return msg
}

// Public is what a client of the model is told: the kind of failure, in
// words vgw or its runtime chose. The whole cause (the server's log
// lines, the Docker daemon's address, paths) is the operator's to read in
// status, events and vgw's log, not every API caller's.
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
	// EventSleeping: a model's server fell asleep; EventWaking: a wake
	// began; EventWoken: the model is ready again, Took after the wake
	// began. A wake that fails is EventWakeFailed, and the model is
	// started again.
	EventSleeping   = "sleeping"
	EventWaking     = "waking"
	EventWoken      = "woken"
	EventWakeFailed = "wake_failed"
	// EventProgress: a loading server's log told a new phase of its
	// start, or a tenth more of one (Detail). Not among EventKinds: it is
	// news for an operator watching, not a count worth keeping.
	EventProgress = "progress"
)

// EventKinds lists every kind of Event, for those who count them.
var EventKinds = []string{EventLoadStarted, EventReady, EventLoadFailed, EventEvicted, EventDraining, EventCrashed, EventUnloaded, EventUnhealthy,
	EventSleeping, EventWaking, EventWoken, EventWakeFailed}

// Options are a Manager's optional settings; the zero value of each is a
// sensible default.
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
	// Clock is the loop's clock; tests move a fake one.
	Clock clockwork.Clock
	// HostMemory is the machine's memory, from which host_memory: auto
	// is worked out; 0 reads /proc/meminfo.
	HostMemory uint64
}

// Manager runs models on GPUs.
type Manager struct {
	rt Runtime
	// sleeper is rt as a Sleeper, nil when its servers cannot sleep.
	sleeper Sleeper
	inv     Inventory
	fps     *Footprints
	log     *slog.Logger
	opts    Options
	clock   clockwork.Clock
	board   *board

	cmds   chan func(now time.Time)
	reread chan struct{} // asks the GPU watcher to read now
	closed chan struct{}
	health *http.Client

	// Owned by the loop.
	ctx     context.Context
	s       *scheduler
	cancels map[*loadOp]context.CancelFunc // of the loads under way
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
	if opts.Clock == nil {
		opts.Clock = clockwork.NewRealClock()
	}
	m := &Manager{
		rt: rt, inv: inv, fps: opts.Footprints, log: opts.Log, opts: opts, clock: opts.Clock,
		board:   newBoard(opts.Clock.Now()),
		cmds:    make(chan func(time.Time), 256),
		reread:  make(chan struct{}, 1),
		closed:  make(chan struct{}),
		health:  &http.Client{}, // each check bounds itself (healthy)
		cancels: map[*loadOp]context.CancelFunc{},
	}
	m.sleeper, _ = rt.(Sleeper)
	if opts.HostMemory == 0 {
		opts.HostMemory = memTotal()
	}
	m.s = newScheduler(cfg, inv.GPUs(), m.fps, opts.Backoff, m.board, opts.Clock.Now())
	m.s.canSleep, m.s.hostTotal = m.sleeper != nil, opts.HostMemory
	m.s.publish() // with the host memory budget
	return m
}

// View returns the latest View of the models and GPUs.
func (m *Manager) View() *View { return m.board.view() }

// Run runs the loop until ctx ends. Model servers are left running: a
// Docker runtime adopts them when vgw starts again.
func (m *Manager) Run(ctx context.Context) error {
	defer close(m.closed)
	m.ctx = ctx
	if r := m.readGPUs(); r != nil {
		m.s.gpusRead(m.clock.Now(), r)
	}
	go m.watchGPUs(ctx)
	m.adopt(ctx)
	m.s.start(m.clock.Now())
	m.act()
	tick := m.clock.NewTicker(m.opts.Tick)
	defer tick.Stop()
	for {
		select {
		case f := <-m.cmds:
			f(m.clock.Now())
		case e := <-m.rt.Exits():
			m.s.exited(m.clock.Now(), e)
		case <-m.board.bell:
			m.s.reconcile(m.clock.Now())
		case now := <-tick.Chan():
			m.board.coarse.Store(now.UnixNano())
			m.s.tick(now)
		case <-ctx.Done():
			return nil
		}
		m.act()
	}
}

// do runs f on the loop, with the time it runs at. It reports false once
// the manager has stopped.
func (m *Manager) do(f func(now time.Time)) bool {
	select {
	case m.cmds <- f:
		return true
	case <-m.closed:
		return false
	}
}

// doCtx is do that also gives up when ctx ends.
func (m *Manager) doCtx(ctx context.Context, f func(now time.Time)) error {
	select {
	case m.cmds <- f:
		return nil
	case <-m.closed:
		return ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	}
}

// call runs f on the loop and waits for it; ErrClosed once the manager
// has stopped.
func (m *Manager) call(f func(now time.Time) error) error {
	done := make(chan error, 1)
	// What f decided is carried out, and shown in a View, before the
	// caller hears back.
	if !m.do(func(now time.Time) { err := f(now); m.act(); done <- err }) {
		return ErrClosed
	}
	select {
	case err := <-done:
		return err
	case <-m.closed:
		return ErrClosed
	}
}

// A Lease is a request's hold on a ready model's server: while any is
// held, the model is neither unloaded for idleness nor stopped before its
// drain timeout. The zero Lease holds nothing, and releasing it does
// nothing.
type Lease struct{ m *ModelView }

// Endpoint is where the leased model took requests when the lease was
// taken: its server's address ("" for the zero Lease, or a model that
// began to drain as its waiters were answered).
func (l Lease) Endpoint() string {
	if l.m == nil {
		return ""
	}
	return l.m.Endpoint
}

// Release gives the lease back. Every Lease taken must be released
// exactly once.
func (l Lease) Release() {
	if l.m == nil {
		return
	}
	l.m.use.lastUsed.Store(l.m.use.board.coarse.Load())
	l.m.use.release(l.m.Name)
}

// TryLease leases the model called name if it is ready now. It is the
// request path's whole cost for a resident model, and allocates nothing:
// one atomic add, three atomic loads and a store, two map reads, and the
// add that Release undoes.
//
// Its steps pair with the scheduler's when it unloads a model: TryLease
// counts first and then reads the state, the scheduler publishes the
// draining state first and then reads the count, so a request either
// sees the model draining or is seen in flight, never neither.
func (m *Manager) TryLease(name string) (Lease, bool) {
	mv := m.board.view().Model(name)
	if mv == nil || mv.Removed {
		return Lease{}, false
	}
	mv.use.inflight.Add(1)
	cur := m.board.view().Model(name) // read after counting: see above
	if cur == nil || cur.use != mv.use || cur.State != Ready || cur.Removed {
		mv.use.release(name)
		return Lease{}, false
	}
	cur.use.lastUsed.Store(m.board.coarse.Load())
	return Lease{cur}, true
}

// Lease returns a lease on the model called name once it is ready,
// loading it, and evicting others, if need be. It waits while the model
// loads, and while no GPU has room, until ctx ends. When ctx's deadline
// passes while the model still could not be placed, it returns the
// *NoRoom diagnostic rather than the deadline.
func (m *Manager) Lease(ctx context.Context, name string) (Lease, error) {
	if l, ok := m.TryLease(name); ok {
		return l, nil
	}
	w := &waiter{reply: make(chan reply, 1)}
	if err := m.doCtx(ctx, func(now time.Time) { m.s.want(now, name, w) }); err != nil {
		return Lease{}, err
	}
	select {
	case r := <-w.reply:
		return Lease{r.m}, r.err
	case <-m.closed:
		if !w.state.CompareAndSwap(waiting, gone) {
			r := <-w.reply
			return Lease{r.m}, r.err
		}
		return Lease{}, ErrClosed
	case <-ctx.Done():
		if !w.state.CompareAndSwap(waiting, gone) {
			r := <-w.reply // answered as we gave up: take the answer
			return Lease{r.m}, r.err
		}
		if p := w.lastErr.Load(); p != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return Lease{}, *p
		}
		return Lease{}, ctx.Err()
	}
}

// waiter is one Lease call waiting for a model. Exactly one of the loop
// (answering) and the caller (giving up) wins its state; an answer of nil
// means the scheduler has counted the request in, as TryLease does, so a
// model that just became ready is busy, not idle, until its waiters'
// requests end.
type waiter struct {
	reply   chan reply
	state   atomic.Int32          // waiting, answered, gone
	lastErr atomic.Pointer[error] // why it could not be placed yet
}

type reply struct {
	m   *ModelView // the model, ready, with the request counted in
	err error
}

const (
	waiting int32 = iota
	answered
	gone
)

// Update applies a new config (see scheduler.configure).
func (m *Manager) Update(cfg *config.Config) error {
	return m.call(func(now time.Time) error { m.s.configure(now, cfg); return nil })
}

// Pin keeps a model from being evicted or unloaded for idleness (on) or
// lets it go again (off), as an operator asks.
func (m *Manager) Pin(name string, on bool) error {
	return m.call(func(time.Time) error { return m.s.pin(name, on) })
}

// Load loads a model as an operator asks, evicting idle ones if need be,
// and at once even during the backoff after a failed load: the operator
// may have fixed the cause. With wait it returns once the model is ready,
// or why it is not, by ctx's end; without, it starts the load and returns,
// and the model is tried until load_timeout as a request's would be.
func (m *Manager) Load(ctx context.Context, name string, wait bool) error {
	err := m.call(func(now time.Time) error { return m.s.load(now, name, wait) })
	if err != nil || !wait {
		return err
	}
	return m.awaitReady(ctx, name)
}

// awaitReady returns once the model called name is ready, or why it is
// not, by ctx's end: a lease taken and given back at once.
func (m *Manager) awaitReady(ctx context.Context, name string) error {
	l, err := m.Lease(ctx, name)
	if err != nil {
		return err
	}
	l.Release()
	return nil
}

// Sleep puts a ready model to sleep now, as an operator asks: at its
// level, once its requests are done (a drain that runs out, at
// drain_timeout, with requests left stops it, as an unload does). It
// fails with ErrCannotSleep when the model cannot sleep (sleep off, not
// ready, no room in host_memory). With wait it returns once the model
// sleeps (or a request has woken it since), or why it does not (its
// sleep failed, or something else unloaded it), by ctx's end.
func (m *Manager) Sleep(ctx context.Context, name string, wait bool) error {
	if err := m.call(func(now time.Time) error { return m.s.sleepAsked(now, name) }); err != nil || !wait {
		return err
	}
	for {
		v := m.View()
		switch mv := v.Model(name); {
		case mv == nil:
			return fmt.Errorf("%w: %s", ErrUnknownModel, name)
		case mv.State == Sleeping, mv.State == Waking, mv.State == Ready:
			return nil // asleep, or woken already by a request that came as it fell asleep
		case mv.State != Draining:
			return fmt.Errorf("model %s is %s, not asleep: %w", name, mv.State, ErrNotAsleep)
		}
		select {
		case <-v.Changed():
		case <-ctx.Done():
			return ctx.Err()
		case <-m.closed:
			return ErrClosed
		}
	}
}

// Wake wakes a sleeping model as an operator asks; with wait it returns
// once the model is ready, or why it is not, by ctx's end. It fails with
// ErrNotAsleep for a model that neither sleeps nor wakes.
func (m *Manager) Wake(ctx context.Context, name string, wait bool) error {
	err := m.call(func(now time.Time) error { return m.s.wakeAsked(now, name) })
	if err != nil || !wait {
		return err
	}
	return m.awaitReady(ctx, name)
}

// Unload drains and stops a model now, as an operator asks.
func (m *Manager) Unload(name string) error {
	return m.call(func(now time.Time) error { return m.s.unloadAsked(now, name) })
}

// StopAll unloads every model and waits until all are stopped or ctx ends.
// vgw does not call it when it exits (a restarted vgw adopts its servers);
// it is for tests and for an operator emptying the GPUs.
func (m *Manager) StopAll(ctx context.Context) error {
	for {
		running := 0
		if err := m.call(func(now time.Time) error { running = m.s.stopAll(now); return nil }); err != nil {
			return err
		}
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
