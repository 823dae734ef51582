package manager

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/manager/gpu"
	"github.com/vgw-project/vgw/manager/runtime"
	"github.com/vgw-project/vgw/manager/runtime/vllm"
)

// scheduler is the manager's decision core. It holds the state of every
// model and GPU, takes events (a request wants a model, a load ended, a
// server exited, the config changed, an operator acted, time passed) and
// answers with actions (start a server, stop one, probe it, measure it,
// tell the operator), which the Manager's executor carries out and
// reports back as further events. It does no I/O, reads no clock (every
// event brings the time), starts no goroutine and logs nothing itself, so
// its decisions are table-tested without processes or sleeps
// (scheduler_test.go). Only the Manager's loop goroutine calls it.
//
// What the request path reads is published as a View (see publish); the
// request path writes only each model's use counts.
type scheduler struct {
	cfg          *config.Config
	gpus         []gpu.GPU
	fps          footprintLookup
	firstBackoff time.Duration // after a first failed load; see backoffAfter

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
	reading  *gpuReading // the latest, nil before the first
	// canSleep says the runtime can put servers to sleep (a Sleeper), and
	// hostTotal is the machine's memory, for host_memory: auto.
	canSleep  bool
	hostTotal uint64

	out   []action // decided, not yet carried out
	board *board   // where Views are published
	dirty bool     // something a View shows changed since the last publish
}

// footprintLookup finds what a model was measured to use under a
// signature of its settings.
type footprintLookup interface {
	Get(model, signature string) (Footprint, bool)
}

// model is the scheduler's record of one model.
type model struct {
	name    string
	cfg     *config.Model
	sig     string // of the config in force: the memory settings, for footprints
	launch  string // of the config in force; inst.Launch is what runs
	use     *use   // its requests, counted by the request path
	state   State
	removed bool // gone from the config: unload once idle

	// Its server, and where it runs or is placed to.
	inst  *runtime.Instance
	pids  instPIDs // inst's processes, found once it was ready
	place placement

	// What is under way.
	loading  *loadOp  // the load in progress, if any
	evicting []string // models to be gone before this one starts
	stopping bool     // a stop (or sleep) is under way
	drainBy  time.Time
	// sleepTo is the level a draining model is to sleep at; 0 stops it.
	// sleep is its server's sleep while it sleeps (and wakes, or is
	// stopped from its sleep), and seen what its sleeps were measured to
	// keep (sleep.go).
	sleepTo int
	sleep   sleepInfo
	seen    sleepSeen
	// sleepAfter are the sleepers stopped to make host memory for md's
	// sleep: it falls asleep only once they have stopped. stopAfter says
	// its sleep, under way, is to end in a stop: an unload came, or its
	// server exited.
	sleepAfter []string
	stopAfter  bool
	// took is how long its last cold load and its last wake took, for
	// the time a load or wake under way is expected to take yet.
	took struct{ load, wake time.Duration }

	// Who wants it.
	waiters   []*waiter
	keepUntil time.Time // an operator asked to load it: placed though no request waits, until then
	pinned    bool

	backoff backoff
	health  health
}

// placement is where a model goes: its GPUs and its memory on each.
type placement struct {
	gpus   []int
	perGPU uint64
	source string    // where perGPU came from: declared, learned, utilization, default
	since  time.Time // when it was placed, then when it became ready
}

// backoff is how a model's loads have gone: the failures in a row, when
// the next may be tried, and why the last failed or it cannot be placed.
type backoff struct {
	failures int
	retryAt  time.Time
	lastErr  error      // why the last load failed, or why it cannot be placed
	lastLoad *LoadError // the last failed load, answered again during its backoff
}

// health is where a ready model's server stands with its probes
// (probe.go): one at a time, the next due at next; failures counts
// failures in a row; unhealthy says it failed enough of them to be
// stopped without grace, and restart that it is started again once
// stopped (an operator's unload takes that back).
type health struct {
	probing   bool
	next      time.Time
	failures  int
	unhealthy bool
	restart   bool
}

// loadOp is one load of a model: its server's start and the wait for it
// to be healthy. The GPUs it claims stay claimed until it has finished,
// its server stopped if the load failed, so no other start or stop
// overlaps it on those GPUs.
type loadOp struct {
	limit time.Duration // load_timeout
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
	// wake says the op wakes a sleeping server, asleep at level, rather
	// than starting one.
	wake  bool
	level int
	// began is when it began; progress is where the server's log says
	// its start stands, once it has said (seen).
	began    time.Time
	progress vllm.Progress
	seen     bool
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

type gpuReading struct {
	mem   []gpu.Memory
	procs []gpu.Process
}

func newScheduler(cfg *config.Config, gpus []gpu.GPU, fps footprintLookup, backoff time.Duration, b *board, now time.Time) *scheduler {
	s := &scheduler{
		cfg: cfg, gpus: gpus, fps: fps, firstBackoff: backoff, board: b,
		models:   map[string]*model{},
		gpuBusy:  map[int]string{},
		gpuOps:   map[int]int{},
		lastStop: map[int]time.Time{},
	}
	for _, name := range cfg.ModelNames() {
		s.models[name] = s.newModel(name, cfg.Models[name], now)
	}
	s.publish()
	return s
}

func (s *scheduler) newModel(name string, mc *config.Model, now time.Time) *model {
	md := &model{name: name, use: &use{board: s.board}, cfg: mc, sig: Signature(s.cfg, mc), launch: LaunchSignature(s.cfg, mc)}
	md.use.lastUsed.Store(now.UnixNano())
	return md
}

// setState moves md to st; the next publish shows it.
func (s *scheduler) setState(md *model, st State) {
	md.state = st
	s.dirty = true
}

// emit queues an action for the executor.
func (s *scheduler) emit(a action) { s.out = append(s.out, a) }

// take returns the actions decided so far, for the executor, and publishes
// a View if anything it shows changed.
func (s *scheduler) take() []action {
	if s.dirty {
		s.publish()
	}
	out := s.out
	s.out = nil
	return out
}

// publish builds a View of every model now and publishes it.
func (s *scheduler) publish() {
	s.dirty = false
	v := &View{Models: make([]ModelView, 0, len(s.models)), byName: make(map[string]*ModelView, len(s.models))}
	for _, md := range s.sorted() {
		mv := ModelView{
			Name: md.name, State: md.viewState(), Removed: md.removed, GPUs: slices.Clone(md.place.gpus), PerGPU: md.place.perGPU,
			Footprint: md.place.source, Since: md.place.since, AlwaysOn: md.cfg.AlwaysOn,
			Pinned: md.pinned, Waiting: len(md.liveWaiters()), RetryAt: md.backoff.retryAt, use: md.use,
		}
		if !md.removed {
			mv.Limits = s.cfg.LimitsOf(md.name)
		}
		if md.inst != nil {
			mv.Instance, mv.Addr = md.inst.ID, md.inst.Addr
			if md.state == Ready {
				mv.Endpoint = md.inst.Addr
			}
		}
		if md.backoff.lastErr != nil {
			mv.LastError = md.backoff.lastErr.Error()
		}
		if op := md.loading; op != nil {
			mv.Began, mv.Phase, mv.Percent = op.began, "", -1
			if op.seen {
				mv.Phase, mv.Percent = op.progress.Phase.String(), op.progress.Percent
			}
			mv.Expected = md.took.load
			if op.wake {
				mv.Expected = md.took.wake
			}
		}
		if md.asleep() {
			mv.SleepLevel, mv.Residual, mv.HostMemory = md.sleep.level, md.sleep.residual, md.sleep.host
			v.HostUsed += md.sleep.host
		}
		v.Models = append(v.Models, mv)
	}
	for i := range v.Models {
		v.byName[v.Models[i].Name] = &v.Models[i]
	}
	v.HostBudget = s.hostBudget()
	v.GPUs = make([]GPUStatus, len(s.gpus))
	for i, g := range s.gpus {
		v.GPUs[i].GPU = g
		if s.reading != nil && g.Index < len(s.reading.mem) {
			v.GPUs[i].Used = s.reading.mem[g.Index].Used
		}
	}
	s.board.publish(v)
}

// want is a request's wish for a model: it is answered at once when the
// model is ready, unknown or backing off after a failed load, else once
// the model is ready or cannot be.
func (s *scheduler) want(now time.Time, name string, w *waiter) {
	md := s.models[name]
	if md == nil || md.removed {
		s.answerOne(nil, w, fmt.Errorf("%w: %s", ErrUnknownModel, name))
		return
	}
	switch md.state {
	case Ready:
		s.answerOne(md, w, nil)
	case Loading, Draining, Waking:
		// The View's count of waiters catches up at the next tick: not a
		// View of every model per waiting request.
		md.waiters = append(md.waiters, w)
	case Sleeping:
		md.waiters = append(md.waiters, w)
		s.enqueue(md)
		s.schedule(now)
	case Stopped:
		if now.Before(md.backoff.retryAt) && md.backoff.lastLoad != nil {
			again := *md.backoff.lastLoad
			again.Retry, again.Earlier = md.backoff.retryAt.Sub(now), true
			s.answerOne(md, w, &again)
			return
		}
		md.waiters = append(md.waiters, w)
		s.enqueue(md)
		s.schedule(now)
	}
}

// enqueue marks md as wanted: it waits in pending until it can be placed.
func (s *scheduler) enqueue(md *model) {
	if !slices.Contains(s.pending, md) {
		s.pending = append(s.pending, md)
	}
}

func (s *scheduler) dequeue(md *model) {
	s.pending = slices.DeleteFunc(s.pending, func(x *model) bool { return x == md })
}

// liveWaiters drops the waiters that gave up.
func (md *model) liveWaiters() []*waiter {
	md.waiters = slices.DeleteFunc(md.waiters, func(w *waiter) bool { return w.state.Load() == gone })
	return md.waiters
}

// answerAll answers every waiter of md; nil counts each one in.
func (s *scheduler) answerAll(md *model, err error) {
	for _, w := range md.waiters {
		s.answerOne(md, w, err)
	}
	md.waiters = nil
	s.dirty = true
}

// answerOne answers w, unless it gave up. A nil err counts its request in
// with md now, so that md is busy from this decision on; the reply itself
// goes out with the executor's other actions, in order, after the View
// that shows this decision.
func (s *scheduler) answerOne(md *model, w *waiter, err error) {
	if !w.state.CompareAndSwap(waiting, answered) {
		return
	}
	if err == nil {
		md.use.inflight.Add(1)
	}
	name := ""
	if md != nil {
		name = md.name
	}
	s.emit(answer{w: w, model: name, err: err})
}

// schedule places the pending models it can, oldest first.
func (s *scheduler) schedule(now time.Time) {
	for _, md := range slices.Clone(s.pending) {
		if md.state != Stopped && md.state != Sleeping {
			s.dequeue(md) // placed meanwhile (adopted): nothing left to place
			continue
		}
		if len(md.liveWaiters()) == 0 && !s.held(md, now) {
			s.dequeue(md)
			continue
		}
		if now.Before(md.backoff.retryAt) {
			continue // an always_on model in its backoff: tick comes back
		}
		d := s.demandOf(md)
		plan, err := Place(s.snapshot(now), d)
		if err != nil && s.impossible(d) {
			// It would not fit on empty GPUs either: waiting cannot help.
			s.dequeue(md)
			md.backoff.lastErr = err
			s.answerAll(md, err)
			continue
		}
		if err != nil {
			var was *NoRoom
			if !errors.As(md.backoff.lastErr, &was) {
				s.note(slog.LevelInfo, "waiting for GPU memory", slog.String("model", md.name), slog.String("why", err.Error()))
				s.dirty = true // a View per new reason, not per request that waits
			}
			md.backoff.lastErr = err
			for _, w := range md.waiters {
				w.lastErr.Store(&err)
			}
			continue
		}
		s.dequeue(md)
		// keepUntil holds on until it is ready: a placement taken back
		// (unplace) is placed again for an operator's load as for a
		// request.
		for _, w := range md.waiters {
			w.lastErr.Store(nil)
		}
		s.begin(now, md, plan)
	}
}

// impossible reports whether w could not be placed even with every GPU
// empty.
func (s *scheduler) impossible(w Demand) bool {
	empty := Snapshot{}
	for _, g := range s.gpus {
		empty.GPUs = append(empty.GPUs, GPUState{Index: g.Index, Total: g.Total})
	}
	_, err := Place(empty, w)
	return err != nil
}

// keepLoaded says md is always on: loaded at start and after a crash.
func (s *scheduler) keepLoaded(md *model) bool { return md.cfg.AlwaysOn && !md.removed && !s.quiesced }

// held says md is to be placed though no request waits for it: it is
// always on, or an operator asked for it.
func (s *scheduler) held(md *model, now time.Time) bool {
	return s.keepLoaded(md) || (now.Before(md.keepUntil) && !md.removed && !s.quiesced)
}

// demandOf is what placing md asks of the GPUs: its memory per GPU and GPUs.
func (s *scheduler) demandOf(md *model) Demand {
	if md.state == Sleeping && md.inst != nil {
		// A wake: its server takes back what it was started with, on the
		// GPUs it sleeps on, whatever the config says now.
		return Demand{Model: md.name, PerGPU: md.place.perGPU, TP: len(md.place.gpus), Allowed: md.place.gpus}
	}
	md.place.perGPU, md.place.source = s.footprint(md)
	return Demand{Model: md.name, PerGPU: md.place.perGPU, TP: max(md.cfg.TensorParallelSize, 1), Allowed: md.cfg.GPUs}
}

// DefaultUtilization is vLLM's own default --gpu-memory-utilization: what a
// model takes of a GPU when nothing says otherwise.
const DefaultUtilization = 0.9

// footprint is the memory md takes on each of its GPUs: declared, else
// learned under the same settings, else what its utilization takes of a
// GPU; and which of those it is.
func (s *scheduler) footprint(md *model) (uint64, string) {
	tp := uint64(max(md.cfg.TensorParallelSize, 1))
	if md.cfg.VRAM > 0 {
		return uint64(md.cfg.VRAM) / tp, "declared"
	}
	if fp, ok := s.fps.Get(md.name, md.sig); ok && fp.PerGPU > 0 { // 0: only its sleep measured
		return fp.PerGPU, "learned"
	}
	var largest uint64
	for _, g := range s.gpus {
		largest = max(largest, g.Total)
	}
	if u := md.cfg.GPUMemoryUtilization; u > 0 {
		return uint64(u * float64(largest)), "utilization"
	}
	return uint64(DefaultUtilization * float64(largest)), "default"
}

// snapshot is the state Place decides from, built from the models and the
// latest GPU reading. Memory a GPU reports in use beyond what vgw's model
// servers account for is External: other processes, or a stopped server's
// memory not yet freed (the Python gateway's lesson 5: wait for it).
func (s *scheduler) snapshot(now time.Time) Snapshot {
	snap := Snapshot{MaxModels: s.cfg.MaxModels, MinResident: s.cfg.MinResident.Std(), HostBudget: s.hostBudget(), Now: now}
	ours := map[int]uint64{}
	for _, md := range s.models {
		if md.state == Stopped {
			continue
		}
		r := Resident{
			Model: md.name, GPUs: md.place.gpus, PerGPU: md.place.perGPU, Since: md.place.since,
			LastUsed: time.Unix(0, md.use.lastUsed.Load()), InFlight: int(md.use.inflight.Load()),
			AlwaysOn: md.cfg.AlwaysOn, Pinned: md.pinned, Busy: md.state != Ready && md.state != Sleeping,
		}
		r.Leaving = md.state == Draining && md.sleepTo == 0
		switch {
		case md.residualOnly(): // asleep, or being stopped from its sleep
			r.Asleep, r.PerGPU, r.Host = true, md.sleep.residual, md.sleep.host
		case md.state == Waking:
			// A wake holds the memory it needs from the start, the host
			// memory until it is awake, and counts as awake (max_models).
			r.Host = md.sleep.host
		case md.sleepTo > 0:
			_, r.Host = s.foreseen(md, md.sleepTo) // falling asleep: its host memory is spoken for
		case md.state == Ready:
			if level := s.sleepLevel(md); level > 0 {
				r.CanSleep = true
				r.Residual, r.SleepHost = s.foreseen(md, level)
			}
		}
		snap.Residents = append(snap.Residents, r)
		for g, used := range s.attributed(md) {
			ours[g] += used
		}
	}
	for _, g := range s.gpus {
		gs := GPUState{Index: g.Index, Total: g.Total}
		if s.reading != nil && g.Index < len(s.reading.mem) {
			if used := s.reading.mem[g.Index].Used; used > ours[g.Index] {
				gs.External = used - ours[g.Index]
			}
		}
		snap.GPUs = append(snap.GPUs, gs)
	}
	slices.SortFunc(snap.Residents, func(a, b Resident) int { return strings.Compare(a.Model, b.Model) })
	return snap
}

// attributed is the memory md's server is seen using on each GPU: its
// processes' memory where the driver lists them, else its footprint.
func (s *scheduler) attributed(md *model) map[int]uint64 {
	out := map[int]uint64{}
	if md.inst == nil {
		return out
	}
	found := false
	if s.reading != nil {
		for _, p := range s.reading.procs {
			if slices.Contains(md.serverPIDs(), p.PID) {
				out[p.GPU] += p.Used
				found = true
			}
		}
	}
	if !found {
		// No per-process figures: count the model's whole reservation as
		// in use, so that what it holds is not also taken for someone
		// else's memory.
		for _, g := range md.place.gpus {
			out[g] = md.place.perGPU
			if md.residualOnly() {
				out[g] = md.sleep.residual
			}
		}
	}
	return out
}

// begin commits a plan: evict, then start once the evicted are gone and
// no other start or stop is under way on the plan's GPUs.
func (s *scheduler) begin(now time.Time, md *model, plan Plan) {
	if md.state == Sleeping {
		s.setState(md, Waking)
	} else {
		s.setState(md, Loading)
	}
	md.place.gpus, md.place.since = plan.GPUs, now
	md.evicting = append(slices.Clone(plan.Evict), plan.Sleep...)
	md.backoff.lastErr = nil
	s.note(slog.LevelInfo, "placing model", slog.String("model", md.name), slog.Any("gpus", plan.GPUs),
		slog.String("per_gpu", gib(int64(md.place.perGPU))), slog.String("footprint", md.place.source), slog.Any("evict", plan.Evict),
		slog.Any("sleep", plan.Sleep))
	for _, name := range plan.Evict {
		if v := s.models[name]; v != nil {
			s.event(now, v.name, EventEvicted, "to make room for "+md.name, 0)
			s.unload(now, v, "evicted for "+md.name)
		}
	}
	for _, name := range plan.Sleep {
		if v := s.models[name]; v != nil {
			// The sleepers stopped alongside may be making its host memory.
			v.sleepAfter = slices.DeleteFunc(slices.Clone(plan.Evict), func(n string) bool { o := s.models[n]; return o == nil || !o.asleep() })
			s.drain(now, v, "put down for "+md.name, s.sleepLevel(v))
		}
	}
	s.startIfClear(now, md)
}

// startIfClear starts md's server once what it waits for is done: the
// models it evicts are stopped and no start or stop runs on its GPUs.
func (s *scheduler) startIfClear(now time.Time, md *model) {
	waking := md.state == Waking
	if (md.state != Loading && !waking) || md.loading != nil || (md.inst != nil && !waking) {
		return
	}
	for _, name := range md.evicting {
		// Put down: stopped, or asleep (a sleeper to be stopped drains
		// first, so it is not taken for done).
		v := s.models[name]
		switch {
		case v == nil || v.state == Stopped || v.state == Sleeping:
			continue
		case v.state != Draining:
			// Brought back (woken, or loaded again) before md started:
			// the room it made is taken, and md is placed afresh.
			s.unplace(md)
		}
		return
	}
	if !s.claimGPUs(md.name, md.place.gpus) {
		return
	}
	md.evicting = nil
	op := s.newLoadOp(md)
	op.calm = true
	for _, g := range md.place.gpus {
		op.ops[g] = s.gpuOps[g]
		if now.Sub(s.lastStop[g]) < settleTime {
			op.calm = false
		}
	}
	md.loading = op
	op.began = now
	if waking {
		op.wake, op.level = true, md.sleep.level
		s.event(now, md.name, EventWaking, fmt.Sprintf("from level %d on GPUs %v", md.sleep.level, md.place.gpus), 0)
		s.emit(wakeServer{md: md, op: op, inst: md.inst})
		return
	}
	s.event(now, md.name, EventLoadStarted, fmt.Sprintf("on GPUs %v", md.place.gpus), 0)
	s.emit(startServer{md: md, op: op, spec: s.spec(md)})
}

// unplace takes back the placement of md, placed but not started, and
// has it placed again.
func (s *scheduler) unplace(md *model) {
	md.evicting = nil
	if md.state == Waking {
		s.setState(md, Sleeping)
		md.place.gpus = md.inst.GPUs
	} else {
		s.setState(md, Stopped)
		md.place.gpus = nil
	}
	s.enqueue(md)
}

// newLoadOp begins a load of md: its deadline (load_timeout) and how long
// one health check may take (see loadOp.poll).
func (s *scheduler) newLoadOp(md *model) *loadOp {
	op := &loadOp{gpus: md.place.gpus, ops: map[int]int{}, limit: s.cfg.LoadTimeout.Std(), poll: defaultPoll}
	if p := s.cfg.ProbeOf(md.name); p.Interval > 0 {
		op.poll = p.Timeout
	}
	return op
}

// defaultPoll bounds one health check of a loading server whose model is
// not probed once ready.
const defaultPoll = 2 * time.Second

// claimGPUs marks gpus as having a start or stop under way for model, if
// none has.
func (s *scheduler) claimGPUs(model string, gpus []int) bool {
	for _, g := range gpus {
		if _, busy := s.gpuBusy[g]; busy {
			return false
		}
	}
	for _, g := range gpus {
		s.gpuBusy[g] = model
		s.gpuOps[g]++
	}
	return true
}

// freeGPUs ends model's start or stop on gpus, and starts what waited.
func (s *scheduler) freeGPUs(now time.Time, model string, gpus []int) {
	for _, g := range gpus {
		if s.gpuBusy[g] == model {
			delete(s.gpuBusy, g)
		}
	}
	for _, md := range s.sorted() {
		if md.state == Loading || md.state == Waking {
			s.startIfClear(now, md)
		}
	}
}

// settleTime is how long GPU memory takes to come back after a server
// stops (the Python gateway's lesson 5), for judging a measurement.
const settleTime = 5 * time.Second

// spec is what the runtime needs to start md.
func (s *scheduler) spec(md *model) runtime.Spec {
	var gpus []gpu.GPU
	var smallest uint64 = math.MaxUint64
	for _, i := range md.place.gpus {
		g := s.gpus[i]
		gpus = append(gpus, g)
		smallest = min(smallest, g.Total)
	}
	util := md.cfg.GPUMemoryUtilization
	if util == 0 && smallest > 0 {
		// The model's share of its GPUs, so that vLLM sizes its KV cache
		// to the memory vgw reserved and cannot take a neighbour's.
		util = math.Ceil(float64(md.place.perGPU)/float64(smallest)*100) / 100
		util = min(util, DefaultUtilization)
	}
	env := map[string]string{}
	for k, v := range s.cfg.Runtime.Env {
		env[k] = v
	}
	for k, v := range md.cfg.Env {
		env[k] = v
	}
	sleep := s.cfg.SleepFor(md.cfg)
	maps.Copy(env, vllm.Env(sleep))
	return runtime.Spec{
		Model: md.name, Config: md.cfg, Utilization: util, Sleep: sleep, Env: env, GPUs: gpus, PerGPU: md.place.perGPU,
		Signature: md.sig, Launch: md.launch,
	}
}

// started records the server a load started. Its exit may already have
// been seen, as it travels on another channel.
func (s *scheduler) started(md *model, op *loadOp, inst *runtime.Instance) {
	if md.loading != op {
		return
	}
	md.inst = inst
	s.dirty = true
	for i, e := range s.orphans {
		if e.ID == inst.ID {
			s.orphans = slices.Delete(s.orphans, i, i+1)
			s.exitedWhileLoading(md, e)
			return
		}
	}
}

// loaded takes a load whose server answers its health checks: the model
// is ready. took is how long the load took.
func (s *scheduler) loaded(now time.Time, md *model, op *loadOp, took time.Duration, before []gpu.Memory) {
	if md.loading != op {
		return
	}
	if op.exit != nil {
		// Its exit came first (the two travel on different channels): the
		// server that answered is gone, and no other exit will come.
		s.loadFailed(now, md, op, errors.New("its server exited as it became ready"))
		return
	}
	if op.cancelled && op.readded {
		op.cancelled = false // back in the config, and wanted: it stays
	}
	md.loading = nil
	md.keepUntil = time.Time{}
	md.backoff.lastErr, md.backoff.lastLoad = nil, nil
	md.place.since = now // min_resident counts from here
	probe := s.cfg.ProbeOf(md.name)
	md.health.failures, md.health.next = 0, now.Add(probe.Interval)
	if probe.Interval <= 0 {
		md.backoff.failures = 0 // else once a probe passes: see probed
	}
	md.use.lastUsed.Store(now.UnixNano())
	s.setState(md, Ready)
	switch {
	case op.wake:
		s.event(now, md.name, EventWoken, fmt.Sprintf("from level %d in %v at %s", op.level, took.Round(time.Millisecond), md.inst.Addr), took)
		md.sleep = sleepInfo{}
		md.took.wake = took
	case op.adopted:
		s.event(now, md.name, EventReady, "adopted "+md.inst.ID+" at "+md.inst.Addr, 0)
	default:
		s.event(now, md.name, EventReady, fmt.Sprintf("in %v at %s", took.Round(time.Millisecond), md.inst.Addr), took)
		md.took.load = took
	}
	if op.cancelled {
		// Unloaded as it became ready: its waiters are told so, as if it
		// had not come up, rather than leased a model about to drain.
		s.answerAll(md, fmt.Errorf("model %s: %w", md.name, ErrUnloaded))
	}
	s.answerAll(md, nil) // counts the waiters in, so the model is busy, not idle
	if !op.wake {
		s.emit(measureServer{model: md.name, inst: md.inst, op: op, before: before})
		s.emit(listPIDs{md: md, inst: md.inst})
	}
	s.emit(rereadGPUs{}) // so that status shows the memory it took
	s.freeGPUs(now, md.name, op.gpus)
	if op.cancelled {
		s.unload(now, md, "asked to while it loaded")
	}
	s.schedule(now)
}

// BackoffBase and BackoffMax bound the wait after failed loads: it
// doubles with each failure in a row.
const (
	BackoffBase = 5 * time.Second
	BackoffMax  = 5 * time.Minute
)

// ErrUnloaded answers the waiters of a model unloaded before it was ready
// (an operator's unload, or the model leaving the config).
var ErrUnloaded = errors.New("unloaded while it was loading")

// loadFailed ends a load that failed: the start failed, the server exited,
// it never became healthy, or it was unloaded. The executor has stopped
// the server by now.
func (s *scheduler) loadFailed(now time.Time, md *model, op *loadOp, err error) {
	if md.loading != op {
		return
	}
	md.loading = nil
	if md.inst != nil {
		// The executor stopped its server: its memory is coming back,
		// which a measurement on these GPUs must not take for a load's.
		for _, g := range op.gpus {
			s.lastStop[g] = now
		}
	}
	md.inst = nil
	md.sleep = sleepInfo{}
	s.setState(md, Stopped)
	s.emit(rereadGPUs{})
	if op.wake && !op.cancelled {
		s.wakeFailed(now, md, op, err)
		return
	}
	if op.cancelled {
		s.event(now, md.name, EventUnloaded, "before it was ready", 0)
		if op.readded && len(md.liveWaiters()) > 0 {
			// Cancelled as it left the config, which it has come back to
			// since: those who asked for it meanwhile wait for a new load.
			s.enqueue(md)
		} else {
			s.answerAll(md, fmt.Errorf("model %s: %w", md.name, ErrUnloaded))
		}
		s.freeGPUs(now, md.name, op.gpus)
		s.forget(md)
		s.schedule(now)
		return
	}
	if op.exit != nil && op.exit.Removed {
		// Someone removed its server as it loaded: not the model's
		// failure. Its waiters wait on for the next start.
		s.note(slog.LevelWarn, "a loading model's server was removed by someone else; starting it again",
			slog.String("model", md.name), slog.String("instance", op.exit.ID))
		s.event(now, md.name, EventCrashed, "its server was "+op.exit.Reason+" while it loaded; starting it again", 0)
		if len(md.liveWaiters()) > 0 || s.held(md, now) {
			s.enqueue(md)
		}
		s.freeGPUs(now, md.name, op.gpus)
		s.schedule(now)
		return
	}
	tail := ""
	if op.exit != nil {
		err, tail = &exitError{*op.exit}, op.exit.LogTail
	}
	// The runtime being away says nothing about the model: such a failure
	// is retried at the first interval however long the outage, so that
	// the model loads soon after the runtime is back, not minutes later.
	backoff := s.firstBackoff
	if !errors.Is(err, runtime.ErrUnreachable) {
		md.backoff.failures++
		backoff = s.backoffAfter(md.backoff.failures)
	}
	md.backoff.retryAt = now.Add(backoff)
	md.backoff.lastLoad = &LoadError{Model: md.name, Err: err, LogTail: tail, Retry: backoff}
	md.backoff.lastErr = md.backoff.lastLoad
	s.note(slog.LevelError, "model failed to load", slog.String("model", md.name), slog.String("error", err.Error()),
		slog.Int("failures", md.backoff.failures), slog.Duration("retry_in", backoff), slog.String("log_tail", runtime.LastLines(tail, 20)))
	detail := fmt.Sprintf("%v; tried again in %v", err, backoff)
	if tail != "" {
		detail += "; last log lines: " + runtime.LastLines(tail, 5)
	}
	s.event(now, md.name, EventLoadFailed, detail, 0)
	s.answerAll(md, md.backoff.lastLoad)
	if s.keepLoaded(md) {
		s.enqueue(md) // tried again once the backoff has passed
	}
	s.freeGPUs(now, md.name, op.gpus)
	s.schedule(now)
}

// backoffAfter is the wait after the failures-th failure in a row: it
// doubles from the first backoff up to BackoffMax.
func (s *scheduler) backoffAfter(failures int) time.Duration {
	return min(s.firstBackoff<<min(max(failures, 1)-1, 16), BackoffMax)
}

// exitError is an instance that exited, as a load error.
type exitError struct{ runtime.Exit }

func (e *exitError) Error() string {
	return fmt.Sprintf("its server exited (%s, code %d)", e.Reason, e.Code)
}

// exited takes a server that stopped.
func (s *scheduler) exited(now time.Time, e runtime.Exit) {
	for _, md := range s.sorted() {
		if md.inst == nil || md.inst.ID != e.ID {
			continue
		}
		switch md.state {
		case Waking:
			if md.loading == nil {
				s.exitedBeforeWake(now, md, e)
				return
			}
			s.exitedWhileLoading(md, e)
		case Loading:
			s.exitedWhileLoading(md, e)
		case Ready, Sleeping:
			s.note(slog.LevelError, "model crashed", slog.String("model", md.name), slog.Int("code", e.Code),
				slog.String("reason", e.Reason), slog.String("log_tail", runtime.LastLines(e.LogTail, 20)))
			detail := fmt.Sprintf("%s, code %d", e.Reason, e.Code)
			if e.LogTail != "" {
				detail += "; last log lines: " + runtime.LastLines(e.LogTail, 5)
			}
			s.event(now, md.name, EventCrashed, detail, 0)
			md.inst = nil
			md.sleep = sleepInfo{}
			s.setState(md, Stopped)
			s.emit(rereadGPUs{})
			s.forget(md)
			if s.keepLoaded(md) {
				s.enqueue(md)
			}
			s.schedule(now)
		}
		if md.state == Draining {
			md.stopAfter = true // a sleep under way, or to come, ends in a stop: its server is gone
		}
		return // a Draining model's stop is finished when its stop returns
	}
	// Not known (yet): keep it for started, a few only.
	s.orphans = append(s.orphans, e)
	if len(s.orphans) > 64 {
		s.orphans = s.orphans[1:]
	}
}

// exitedWhileLoading ends the load at once rather than at load_timeout:
// the load stops polling, and reports the exit with its log tail. An exit
// the executor asked for, stopping a load that failed, changes nothing.
func (s *scheduler) exitedWhileLoading(md *model, e runtime.Exit) {
	if op := md.loading; op != nil && !e.Requested {
		op.exit = &e
		s.emit(cancelLoad{op: op})
	}
}

// unload drains md and then stops it; a loading model's load is ended.
func (s *scheduler) unload(now time.Time, md *model, reason string) {
	switch md.state {
	case Ready, Sleeping:
		s.drain(now, md, reason, 0)
	case Draining:
		if md.stopping && md.sleepTo > 0 {
			md.stopAfter = true // its sleep is under way: stopped once it ends, its memory counted till then
			return
		}
		md.sleepTo = 0 // to stop, not sleep
	case Waking:
		if md.loading == nil {
			// Placed but not started: it sleeps on, to be stopped.
			s.setState(md, Sleeping)
			md.place.gpus, md.evicting = md.inst.GPUs, nil
			s.answerAll(md, fmt.Errorf("model %s: %w", md.name, ErrUnloaded))
			s.drain(now, md, reason, 0)
			return
		}
		md.loading.cancelled = true
		s.emit(cancelLoad{op: md.loading})
	case Loading:
		if op := md.loading; op != nil {
			op.cancelled = true
			s.emit(cancelLoad{op: op}) // the load stops the server and reports
			return
		}
		// Placed but not started (waiting for evictions or a GPU).
		s.setState(md, Stopped)
		md.place.gpus, md.evicting = nil, nil
		s.answerAll(md, fmt.Errorf("model %s: %w", md.name, ErrUnloaded))
		s.forget(md)
		s.schedule(now)
	}
}

// maybeStop stops a draining model once its requests are done (or the
// drain timeout passed) and no other start or stop runs on its GPUs.
func (s *scheduler) maybeStop(now time.Time, md *model) {
	if md.state != Draining || md.stopping {
		return
	}
	if md.use.inflight.Load() > 0 && now.Before(md.drainBy) {
		return
	}
	sleep := md.sleepTo > 0 && md.use.inflight.Load() == 0 && !md.health.unhealthy && !md.stopAfter
	if sleep {
		for _, name := range md.sleepAfter {
			if v := s.models[name]; v != nil && v.state == Draining && v.asleep() {
				return // the host memory it is to sleep in is not free yet
			}
		}
	}
	if !s.claimGPUs(md.name, md.place.gpus) {
		return
	}
	md.stopping = true
	if sleep {
		md.sleepAfter = nil
		s.emit(sleepServer{md: md, inst: md.inst, level: md.sleepTo, gpus: md.place.gpus, timeout: s.cfg.LoadTimeout.Std()})
		return
	}
	// Never asleep with requests in flight (vllm#28714): a drain that ran
	// out with some left stops the server.
	md.sleepTo = 0
	grace := s.cfg.DrainTimeout.Std()
	if md.health.unhealthy {
		grace = 0 // it failed its health probes: no graceful shutdown to wait for
	}
	s.emit(stopServer{md: md, inst: md.inst, gpus: md.place.gpus, grace: grace})
}

// stopped takes a draining model whose server has stopped.
func (s *scheduler) stopped(now time.Time, md *model, gpus []int, err error) {
	md.stopping = false
	if err != nil {
		s.note(slog.LevelError, "model did not stop cleanly", slog.String("model", md.name), slog.String("error", err.Error()))
	}
	for _, g := range gpus {
		s.lastStop[g] = now
	}
	md.inst = nil
	md.sleep, md.sleepTo, md.sleepAfter, md.stopAfter = sleepInfo{}, 0, nil, false
	s.setState(md, Stopped)
	s.emit(rereadGPUs{})
	s.event(now, md.name, EventUnloaded, "", 0)
	if md.health.restart && !md.removed {
		// Restarted as it was serving, whether or not a request waits;
		// after a second failure in a row (it hung again before passing
		// a probe, or its loads fail), only after a backoff, so a server
		// that cannot stay up is not restarted in a loop.
		start := now
		if md.backoff.failures > 1 {
			md.backoff.retryAt = now.Add(s.backoffAfter(md.backoff.failures - 1))
			start = md.backoff.retryAt
		}
		md.keepUntil = start.Add(s.cfg.LoadTimeout.Std())
		s.enqueue(md)
	}
	md.health.unhealthy, md.health.restart = false, false
	if len(md.liveWaiters()) > 0 || s.keepLoaded(md) {
		s.enqueue(md)
	}
	s.forget(md)
	s.freeGPUs(now, md.name, gpus)
	s.reconcile(now) // a sleep may wait for the host memory this stop gave back
}

// forget drops a model removed from the config once it is stopped and no
// request of it is in flight: until then a config that brings it back
// finds it as it is, its requests still counted.
func (s *scheduler) forget(md *model) {
	if md.removed && md.state == Stopped && md.use.inflight.Load() <= 0 && s.models[md.name] == md {
		delete(s.models, md.name)
		s.dirty = true
	}
}

// reconcile runs when something may have freed: a draining model's last
// request ended, or the GPUs' memory changed.
func (s *scheduler) reconcile(now time.Time) {
	for _, md := range s.sorted() {
		s.maybeStop(now, md)
	}
	s.schedule(now)
}

// gpusRead takes a new reading of the GPUs' memory.
func (s *scheduler) gpusRead(now time.Time, r *gpuReading) {
	s.reading = r
	s.dirty = true
	s.reconcile(now)
}

// tick applies the timeouts: drains that ran out, idle models, models
// whose settings changed; probes what is due; and retries placement, as
// memory may have come back.
func (s *scheduler) tick(now time.Time) {
	for _, md := range s.sorted() {
		// What a View leaves out between ticks: waiters come and go, and
		// why a model waits for memory changes with its neighbours.
		if mv := s.board.view().Model(md.name); mv == nil || mv.Waiting != len(md.liveWaiters()) ||
			(md.backoff.lastErr != nil && mv.LastError != md.backoff.lastErr.Error()) {
			s.dirty = true
		}
		switch md.state {
		case Stopped:
			s.forget(md)
		case Draining:
			s.maybeStop(now, md)
		case Ready:
			s.maybeProbe(now, md)
			idle := md.use.inflight.Load() == 0
			switch {
			case md.removed && idle:
				s.unload(now, md, "it was removed from the config")
			case md.stale() && idle:
				s.unload(now, md, "its settings changed")
			case idle && !s.keepLoaded(md) && !md.pinned:
				if t := s.cfg.InactivityOf(md.name); t > 0 && now.Sub(time.Unix(0, md.use.lastUsed.Load())) >= t {
					s.retire(now, md, "idle for "+t.String())
				}
			}
		case Sleeping:
			switch {
			case md.removed:
				s.unload(now, md, "it was removed from the config")
			case md.stale():
				s.unload(now, md, "its settings changed")
			case s.keepLoaded(md):
				s.enqueue(md) // always_on (adopted asleep, or made so since): woken
			case s.cfg.SleepFor(md.cfg).Level() == 0:
				s.unload(now, md, "its sleep was turned off")
			}
		}
	}
	// Host memory past its budget (lowered, or a sleeper larger than
	// foreseen): the least recently used sleepers stop.
	for _, name := range OverHost(s.snapshot(now)) {
		s.unload(now, s.models[name], "host memory is past host_memory")
	}
	s.schedule(now)
}

// configure applies a new config. New models can be asked for at once; a
// model that is gone, or whose memory settings changed, is unloaded once
// it is idle (its requests in flight finish on the old server), and the
// next request loads it under the new settings. Limits and timeouts apply
// to the next decision.
func (s *scheduler) configure(now time.Time, cfg *config.Config) {
	s.cfg = cfg
	s.dirty = true
	var leaving []*model // loading, and gone from the config
	for _, md := range s.sorted() {
		mc, ok := cfg.Models[md.name]
		if !ok {
			md.removed = true
			s.answerAll(md, fmt.Errorf("%w: %s", ErrUnknownModel, md.name))
			if md.state == Loading || md.state == Waking {
				leaving = append(leaving, md)
			}
			s.forget(md)
			continue
		}
		if md.removed && md.loading != nil && md.loading.cancelled {
			md.loading.readded = true
		}
		md.removed = false
		if sig := Signature(cfg, mc); sig != md.sig {
			md.seen = sleepSeen{} // measured under other settings
		}
		md.sig = Signature(cfg, mc)
		md.launch = LaunchSignature(cfg, mc) // a server running other settings is stale: see tick
		md.cfg = mc
		if mc.AlwaysOn && md.state == Stopped {
			s.enqueue(md)
		}
	}
	for _, name := range cfg.ModelNames() {
		if _, ok := s.models[name]; !ok {
			md := s.newModel(name, cfg.Models[name], now)
			s.models[name] = md
			if md.cfg.AlwaysOn {
				s.enqueue(md)
			}
		}
	}
	// Nobody can ask for these any more: a load would only hold GPU
	// memory until load_timeout. (A ready model is unloaded once idle, by
	// tick.) Unloaded once every model has its new config.
	for _, md := range leaving {
		s.unload(now, md, "it was removed from the config")
	}
	s.schedule(now)
}

// start places the always-on models, once the servers found running have
// been adopted.
func (s *scheduler) start(now time.Time) {
	for _, md := range s.sorted() {
		if md.cfg.AlwaysOn && md.state == Stopped {
			s.enqueue(md)
		}
	}
	s.schedule(now)
}

// operate runs an operator's action f on the model called name. It fails
// with ErrUnknownModel when there is none (or it has left the config,
// unless removedToo).
func (s *scheduler) operate(name string, removedToo bool, f func(*model)) error {
	md := s.models[name]
	if md == nil || (md.removed && !removedToo) {
		return fmt.Errorf("%w: %s", ErrUnknownModel, name)
	}
	f(md)
	s.dirty = true
	return nil
}

// pin keeps md from being evicted or unloaded for idleness, or lets it go.
func (s *scheduler) pin(name string, on bool) error {
	return s.operate(name, false, func(md *model) { md.pinned = on })
}

// load is an operator's load: at once even during the backoff after a
// failed load (the operator may have fixed the cause); without a request
// waiting, the model is held until load_timeout as a request's would be.
func (s *scheduler) load(now time.Time, name string, wait bool) error {
	return s.operate(name, false, func(md *model) {
		md.backoff.retryAt = time.Time{}
		if !wait && (md.state == Stopped || md.state == Sleeping) {
			s.enqueue(md)
			md.keepUntil = now.Add(s.cfg.LoadTimeout.Std())
			s.schedule(now)
		}
	})
}

// unloadAsked is an operator's unload.
func (s *scheduler) unloadAsked(now time.Time, name string) error {
	return s.operate(name, true, func(md *model) {
		// An operator's unload wins over a restart an unhealthy model was
		// being drained for.
		md.health.restart, md.keepUntil = false, time.Time{}
		s.unload(now, md, "asked to")
	})
}

// stopAll unloads every model and keeps always_on ones from coming back;
// it reports how many were still running.
func (s *scheduler) stopAll(now time.Time) int {
	s.quiesced = true
	s.pending = nil
	running := 0
	for _, md := range s.sorted() {
		s.answerAll(md, ErrClosed)
	}
	for _, md := range s.sorted() {
		if md.state != Stopped {
			running++
			s.unload(now, md, "stopping all")
		}
	}
	return running
}

// adopted takes over the servers a previous vgw left running: those whose
// model is configured with the same launch settings are kept, and ready
// once their /health answers (one may still be loading); the rest are
// stopped.
func (s *scheduler) adopted(insts []*runtime.Instance) {
	for _, inst := range insts {
		md := s.models[inst.Model]
		if md != nil && md.inst != nil && md.inst.ID == inst.ID {
			continue // already ours: a start found it running
		}
		if md != nil && md.loading != nil && md.inst == nil {
			continue // its own start is under way: most likely this very server
		}
		if md == nil || md.removed || md.launch != inst.Launch || md.inst != nil || md.state != Stopped || inst.Addr == "" {
			s.note(slog.LevelInfo, "stopping a model server that does not match the config", slog.String("model", inst.Model), slog.String("id", inst.ID))
			s.emit(stopServer{inst: inst, grace: s.cfg.DrainTimeout.Std()})
			continue
		}
		md.place.gpus = inst.GPUs
		md.place.perGPU, md.place.source = s.footprint(md)
		s.setState(md, Loading)
		s.claimGPUs(md.name, md.place.gpus) // it may still be starting: no neighbour starts meanwhile
		op := s.newLoadOp(md)
		op.adopted = true
		md.loading, md.inst = op, inst
		s.dequeue(md) // placed now: schedule must not place it again
		s.emit(resumeServer{md: md, op: op, inst: inst, sleepMode: s.canSleep && s.cfg.SleepFor(md.cfg).Level() > 0})
	}
}

// listed records the processes of a server that just became ready.
func (s *scheduler) listed(md *model, inst *runtime.Instance, pids []int) {
	md.pids = instPIDs{inst, pids}
}

// measured takes what a ready model's server was measured to use per GPU,
// under the signature of the settings it runs, and how ("processes":
// its processes' memory, as the driver lists it; "delta": the rise in its
// GPUs' used memory since before it started). A difference is trusted
// only when nothing else of vgw's started or stopped on those GPUs from
// settleTime before the load until the reading: a neighbour's memory may
// still be coming back, or going.
func (s *scheduler) measured(name string, op *loadOp, fp Footprint) {
	if fp.How == "delta" && !(op.calm && s.untouched(op)) {
		return
	}
	s.emit(saveFootprint{model: name, fp: fp})
}

// untouched reports whether no start or stop but op's own has claimed
// op's GPUs since it did.
func (s *scheduler) untouched(op *loadOp) bool {
	for g, n := range op.ops {
		if s.gpuOps[g] != n {
			return false
		}
	}
	return true
}

// sorted returns the models in name order, for deterministic loops.
func (s *scheduler) sorted() []*model {
	out := make([]*model, 0, len(s.models))
	for _, md := range s.models {
		out = append(out, md)
	}
	slices.SortFunc(out, func(a, b *model) int { return strings.Compare(a.name, b.name) })
	return out
}

// event tells the operator of a lifecycle change.
func (s *scheduler) event(now time.Time, model, kind, detail string, took time.Duration) {
	s.emit(tell{Event{Time: now, Model: model, Kind: kind, Detail: detail, Took: took}})
}

// note asks the executor to log a line.
func (s *scheduler) note(level slog.Level, msg string, attrs ...slog.Attr) {
	s.emit(logLine{level: level, msg: msg, attrs: attrs})
}
