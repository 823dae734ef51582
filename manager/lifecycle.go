package manager

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/manager/gpu"
	"github.com/vgw-project/vgw/manager/runtime"
)

// Everything in this file runs on the loop, except the functions named
// as workers, which run on their own goroutines and post back with do.

// snapshot is the state Place decides from, built from the models and the
// latest GPU reading. Memory a GPU reports in use beyond what vgw's model
// servers account for is External: other processes, or a stopped server's
// memory not yet freed (the Python gateway's lesson 5: wait for it).
func (m *Manager) snapshot(now time.Time) Snapshot {
	s := Snapshot{MaxModels: m.cfg.MaxModels, MinResident: m.cfg.MinResident.Std(), Now: now}
	reading := m.reading.Load()
	ours := map[int]uint64{}
	for _, md := range m.models {
		if md.state() == Stopped {
			continue
		}
		s.Residents = append(s.Residents, Resident{
			Model: md.name, GPUs: md.gpus, PerGPU: md.perGPU, Since: md.since,
			LastUsed: time.Unix(0, md.h.lastUsed.Load()), InFlight: int(md.h.inflight.Load()),
			AlwaysOn: md.cfg.AlwaysOn, Pinned: md.pinned, Busy: md.state() != Ready,
		})
		for g, used := range m.attributed(md, reading) {
			ours[g] += used
		}
	}
	slices.SortFunc(s.Residents, func(a, b Resident) int { return strings.Compare(a.Model, b.Model) })
	for _, g := range m.gpus {
		gs := GPUState{Index: g.Index, Total: g.Total}
		if reading != nil && g.Index < len(reading.mem) {
			if used := reading.mem[g.Index].Used; used > ours[g.Index] {
				gs.External = used - ours[g.Index]
			}
		}
		s.GPUs = append(s.GPUs, gs)
	}
	return s
}

// attributed is the memory md's server is seen using on each GPU: its
// processes' memory where the driver lists them, else its footprint.
func (m *Manager) attributed(md *model, r *gpuReading) map[int]uint64 {
	out := map[int]uint64{}
	if md.inst == nil {
		return out
	}
	found := false
	if r != nil {
		for _, p := range r.procs {
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
		for _, g := range md.gpus {
			out[g] = md.perGPU
		}
	}
	return out
}

// begin commits a plan: evict, then start once the evicted are gone and
// no other start or stop is under way on the plan's GPUs.
func (m *Manager) begin(md *model, plan Plan) {
	md.setState(Loading)
	md.gpus, md.since, md.evicting = plan.GPUs, time.Now(), plan.Evict
	md.lastErr = nil
	m.log.Info("placing model", slog.String("model", md.name), slog.Any("gpus", plan.GPUs),
		slog.String("per_gpu", gib(int64(md.perGPU))), slog.String("footprint", md.source), slog.Any("evict", plan.Evict))
	for _, name := range plan.Evict {
		if v := m.models[name]; v != nil {
			m.event(v.name, EventEvicted, "to make room for "+md.name)
			m.unload(v, "evicted for "+md.name)
		}
	}
	m.startIfClear(md)
}

// startIfClear starts md's server once what it waits for is done: the
// models it evicts are stopped and no start or stop runs on its GPUs.
func (m *Manager) startIfClear(md *model) {
	if md.state() != Loading || md.loading != nil || md.inst != nil {
		return
	}
	for _, name := range md.evicting {
		if v := m.models[name]; v != nil && v.state() != Stopped {
			return
		}
	}
	if !m.claimGPUs(md.name, md.gpus) {
		return
	}
	md.evicting = nil
	op := m.newLoadOp(md)
	op.calm = true
	for _, g := range md.gpus {
		op.ops[g] = m.gpuOps[g]
		if time.Since(m.lastStop[g]) < settleTime {
			op.calm = false
		}
	}
	md.loading = op
	spec := m.spec(md)
	m.event(md.name, EventLoadStarted, fmt.Sprintf("on GPUs %v", md.gpus))
	go m.load(md, op, spec)
}

// newLoadOp begins a load of md on the loop: its deadline (load_timeout)
// and how long one health check may take (see loadOp.poll).
func (m *Manager) newLoadOp(md *model) *loadOp {
	op := &loadOp{gpus: md.gpus, ops: map[int]int{}, limit: m.cfg.LoadTimeout.Std(), poll: defaultPoll}
	op.ctx, op.cancel = context.WithTimeout(m.ctx, op.limit)
	if p := m.cfg.ProbeOf(md.name); p.Interval > 0 {
		op.poll = p.Timeout
	}
	return op
}

// defaultPoll bounds one health check of a loading server whose model is
// not probed once ready.
const defaultPoll = 2 * time.Second

// claimGPUs marks gpus as having a start or stop under way for model, if
// none has.
func (m *Manager) claimGPUs(model string, gpus []int) bool {
	for _, g := range gpus {
		if _, busy := m.gpuBusy[g]; busy {
			return false
		}
	}
	for _, g := range gpus {
		m.gpuBusy[g] = model
		m.gpuOps[g]++
	}
	return true
}

// releaseGPUs ends model's start or stop on gpus, and starts what waited.
func (m *Manager) releaseGPUs(model string, gpus []int) {
	for _, g := range gpus {
		if m.gpuBusy[g] == model {
			delete(m.gpuBusy, g)
		}
	}
	m.startWaiting()
}

// settleTime is how long GPU memory takes to come back after a server
// stops (the Python gateway's lesson 5), for judging a measurement.
const settleTime = 5 * time.Second

// spec is what the runtime needs to start md.
func (m *Manager) spec(md *model) runtime.Spec {
	var gpus []gpu.GPU
	var smallest uint64 = math.MaxUint64
	for _, i := range md.gpus {
		g := m.gpus[i]
		gpus = append(gpus, g)
		smallest = min(smallest, g.Total)
	}
	util := md.cfg.GPUMemoryUtilization
	if util == 0 && smallest > 0 {
		// The model's share of its GPUs, so that vLLM sizes its KV cache
		// to the memory vgw reserved and cannot take a neighbour's.
		util = math.Ceil(float64(md.perGPU)/float64(smallest)*100) / 100
		util = min(util, DefaultUtilization)
	}
	env := map[string]string{}
	for k, v := range m.cfg.Runtime.Env {
		env[k] = v
	}
	for k, v := range md.cfg.Env {
		env[k] = v
	}
	return runtime.Spec{
		Model: md.name, Config: md.cfg, Utilization: util, Env: env, GPUs: gpus, PerGPU: md.perGPU, Signature: md.sig, Launch: md.launch,
	}
}

// load is a worker: it starts the server and polls its health. When the
// load fails it stops the server itself before reporting, so the GPUs the
// load claimed are free only once nothing of it runs.
func (m *Manager) load(md *model, op *loadOp, spec runtime.Spec) {
	began := time.Now()
	before, _ := m.inv.Memory() // for measuring by difference; see measure
	inst, err := m.rt.Start(op.ctx, spec)
	if err == nil {
		m.do(func() { m.started(md, op, inst) })
		err = m.waitHealthy(op, inst.Addr)
	}
	if err == nil {
		m.do(func() { m.loadReady(md, op, time.Since(began), before) })
		return
	}
	if m.ctx.Err() != nil {
		return // vgw is stopping: the server loads on, for the next vgw to adopt
	}
	if inst != nil {
		m.rt.Stop(context.Background(), inst, 0) // it never served: nothing to drain
	}
	m.do(func() { m.loadFailed(md, op, err) })
}

// waitHealthy polls GET /health until it answers 200, within op.poll:
// every 2 ms at first, backing off to every 5 ms, so a server is seen
// ready at most 5 ms after it is. vLLM opens its HTTP port only once its
// engine is up, so while it loads a poll is a refused connection: no
// request, no access-log line; once up, the first poll finds it ready.
func (m *Manager) waitHealthy(op *loadOp, addr string) error {
	wait := 2 * time.Millisecond
	for {
		if m.healthy(op.ctx, addr, op.poll) == nil {
			return nil
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-op.ctx.Done():
			t.Stop()
			if errors.Is(op.ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("%w %v", ErrLoadTimeout, op.limit)
			}
			return op.ctx.Err()
		}
		wait = min(wait*3/2+time.Millisecond, healthPollMax)
	}
}

// started records the server a load started. Its exit may already have
// been seen, as it travels on another channel.
func (m *Manager) started(md *model, op *loadOp, inst *runtime.Instance) {
	if md.loading != op {
		return
	}
	md.inst = inst
	for i, e := range m.orphans {
		if e.ID == inst.ID {
			m.orphans = slices.Delete(m.orphans, i, i+1)
			m.exitedWhileLoading(md, e)
			return
		}
	}
}

func (m *Manager) loadReady(md *model, op *loadOp, took time.Duration, before []gpu.Memory) {
	if md.loading != op {
		return
	}
	md.loading = nil
	op.cancel()
	md.lastErr, md.lastLoad = nil, nil
	md.since = time.Now() // min_resident counts from here
	probe := m.cfg.ProbeOf(md.name)
	md.probeFailures, md.nextProbe = 0, md.since.Add(probe.Interval)
	if probe.Interval <= 0 {
		md.failures = 0 // else once a probe passes: see probed
	}
	md.h.addr.Store(&md.inst.Addr)
	md.h.lastUsed.Store(time.Now().UnixNano())
	md.setState(Ready)
	if op.adopted {
		m.event(md.name, EventReady, "adopted "+md.inst.ID+" at "+md.inst.Addr)
	} else {
		m.eventTook(md.name, EventReady, fmt.Sprintf("in %v at %s", took.Round(time.Millisecond), md.inst.Addr), took)
	}
	md.answer(nil) // counts the waiters in, so the model is busy, not idle
	go m.measure(md.name, md.inst, op, before)
	go m.listPIDs(md, md.inst)
	m.rereadGPUs() // so that status shows the memory it took
	m.releaseGPUs(md.name, op.gpus)
	if op.cancelled {
		m.unload(md, "asked to while it loaded")
	}
	m.schedule()
}

// healthPollMax is the longest pause between health polls.
const healthPollMax = 5 * time.Millisecond

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
// it never became healthy, or it was unloaded. The worker has stopped the
// server by now.
func (m *Manager) loadFailed(md *model, op *loadOp, err error) {
	if md.loading != op {
		return
	}
	md.loading = nil
	op.cancel()
	md.inst = nil
	md.setState(Stopped)
	m.rereadGPUs()
	if op.cancelled {
		m.event(md.name, EventUnloaded, "before it was ready")
		if op.readded && len(md.liveWaiters()) > 0 {
			// Cancelled as it left the config, which it has come back to
			// since: those who asked for it meanwhile wait for a new load.
			m.want(md)
		} else {
			md.answer(fmt.Errorf("model %s: %w", md.name, ErrUnloaded))
		}
		m.releaseGPUs(md.name, op.gpus)
		m.forget(md)
		m.schedule()
		return
	}
	if op.exit != nil && op.exit.Removed {
		// Someone removed its container as it loaded: not the model's
		// failure. Its waiters wait on for the next start.
		m.log.Warn("a loading model's server was removed by someone else; starting it again", slog.String("model", md.name),
			slog.String("instance", op.exit.ID))
		m.event(md.name, EventCrashed, "its server was "+op.exit.Reason+" while it loaded; starting it again")
		if len(md.liveWaiters()) > 0 || m.wanted(md) {
			m.want(md)
		}
		m.releaseGPUs(md.name, op.gpus)
		m.schedule()
		return
	}
	tail := ""
	if op.exit != nil {
		err, tail = &exitError{*op.exit}, op.exit.LogTail
	}
	// The runtime (Docker) being away says nothing about the model: such a
	// failure is retried at the first interval however long the outage, so
	// that the model loads soon after it is back, not minutes later.
	backoff := m.opts.Backoff
	if !errors.Is(err, runtime.ErrUnreachable) {
		md.failures++
		backoff = m.backoff(md.failures)
	}
	md.retryAt = time.Now().Add(backoff)
	md.lastLoad = &LoadError{Model: md.name, Err: err, LogTail: tail, Retry: backoff}
	md.lastErr = md.lastLoad
	m.log.Error("model failed to load", slog.String("model", md.name), slog.String("error", err.Error()),
		slog.Int("failures", md.failures), slog.Duration("retry_in", backoff), slog.String("log_tail", lastLines(tail, 20)))
	detail := fmt.Sprintf("%v; tried again in %v", err, backoff)
	if tail != "" {
		detail += "; last log lines: " + lastLines(tail, 5)
	}
	m.event(md.name, EventLoadFailed, detail)
	md.answer(md.lastLoad)
	if m.keepLoaded(md) {
		m.want(md) // tried again once the backoff has passed
	}
	m.releaseGPUs(md.name, op.gpus)
	m.schedule()
}

// backoff is the wait after the failures-th failure in a row: it doubles
// from Options.Backoff up to BackoffMax.
func (m *Manager) backoff(failures int) time.Duration {
	return min(m.opts.Backoff<<min(max(failures, 1)-1, 16), BackoffMax)
}

// exitError is an instance that exited, as a load error.
type exitError struct{ runtime.Exit }

func (e *exitError) Error() string {
	return fmt.Sprintf("its server exited (%s, code %d)", e.Reason, e.Code)
}

// exited handles a server that stopped.
func (m *Manager) exited(e runtime.Exit) {
	for _, md := range m.models {
		if md.inst == nil || md.inst.ID != e.ID {
			continue
		}
		switch md.state() {
		case Loading:
			m.exitedWhileLoading(md, e)
		case Ready:
			m.log.Error("model crashed", slog.String("model", md.name), slog.Int("code", e.Code),
				slog.String("reason", e.Reason), slog.String("log_tail", lastLines(e.LogTail, 20)))
			detail := fmt.Sprintf("%s, code %d", e.Reason, e.Code)
			if e.LogTail != "" {
				detail += "; last log lines: " + lastLines(e.LogTail, 5)
			}
			m.event(md.name, EventCrashed, detail)
			md.inst = nil
			md.h.addr.Store(nil)
			md.setState(Stopped)
			m.rereadGPUs()
			m.forget(md)
			if m.keepLoaded(md) {
				m.want(md)
			}
			m.schedule()
		}
		return // a Draining model's stop is finished by its stop worker
	}
	// Not known (yet): keep it for started, a few only.
	m.orphans = append(m.orphans, e)
	if len(m.orphans) > 64 {
		m.orphans = m.orphans[1:]
	}
}

// exitedWhileLoading ends the load at once rather than at load_timeout:
// the worker stops polling, and reports the exit with its log tail. An
// exit the worker asked for, stopping a load that failed, changes nothing.
func (m *Manager) exitedWhileLoading(md *model, e runtime.Exit) {
	if op := md.loading; op != nil && !e.Requested {
		op.exit = &e
		op.cancel()
	}
}

// unload drains md and then stops it; a loading model's load is ended.
func (m *Manager) unload(md *model, reason string) {
	switch md.state() {
	case Ready:
		md.setState(Draining) // before reading the count: see Acquire
		md.drainBy = time.Now().Add(m.cfg.DrainTimeout.Std())
		m.event(md.name, EventDraining, fmt.Sprintf("%s; %d in flight", reason, md.h.inflight.Load()))
		m.maybeStop(md)
	case Loading:
		if op := md.loading; op != nil {
			op.cancelled = true
			op.cancel() // the worker stops the server and reports
			return
		}
		// Placed but not started (waiting for evictions or a GPU).
		md.setState(Stopped)
		md.gpus, md.evicting = nil, nil
		md.answer(fmt.Errorf("model %s: %w", md.name, ErrUnloaded))
		m.forget(md)
		m.schedule()
	}
}

// maybeStop stops a draining model once its requests are done (or the
// drain timeout passed) and no other start or stop runs on its GPUs.
func (m *Manager) maybeStop(md *model) {
	if md.state() != Draining || md.stopping {
		return
	}
	if md.h.inflight.Load() > 0 && time.Now().Before(md.drainBy) {
		return
	}
	if !m.claimGPUs(md.name, md.gpus) {
		return
	}
	md.stopping = true
	inst, gpus, grace := md.inst, md.gpus, m.cfg.DrainTimeout.Std()
	if md.unhealthy {
		grace = 0 // it failed its health probes: no graceful shutdown to wait for
	}
	go func() {
		err := m.rt.Stop(m.ctx, inst, grace)
		m.do(func() { m.stopped(md, gpus, err) })
	}()
}

func (m *Manager) stopped(md *model, gpus []int, err error) {
	md.stopping = false
	if err != nil {
		m.log.Error("model did not stop cleanly", slog.String("model", md.name), slog.String("error", err.Error()))
	}
	now := time.Now()
	for _, g := range gpus {
		m.lastStop[g] = now
	}
	md.inst = nil
	md.h.addr.Store(nil)
	md.setState(Stopped)
	m.rereadGPUs()
	m.event(md.name, EventUnloaded, "")
	if md.restart && !md.removed {
		// Restarted as it was serving, whether or not a request waits;
		// after a second failure in a row (it hung again before passing
		// a probe, or its loads fail), only after a backoff, so a server
		// that cannot stay up is not restarted in a loop.
		start := now
		if md.failures > 1 {
			md.retryAt = now.Add(m.backoff(md.failures - 1))
			start = md.retryAt
		}
		md.keepUntil = start.Add(m.cfg.LoadTimeout.Std())
		m.want(md)
	}
	md.unhealthy, md.restart = false, false
	if len(md.liveWaiters()) > 0 || m.keepLoaded(md) {
		m.want(md)
	}
	m.forget(md)
	m.releaseGPUs(md.name, gpus)
	m.schedule()
}

// forget drops a model removed from the config once it is stopped and no
// request of it is in flight, so a late Release cannot reach a new model
// of the same name.
func (m *Manager) forget(md *model) {
	if md.removed && md.state() == Stopped && md.h.inflight.Load() <= 0 && m.models[md.name] == md {
		delete(m.models, md.name)
		m.publish()
	}
}

// startWaiting starts the loads that waited for a GPU or an eviction.
func (m *Manager) startWaiting() {
	for _, md := range m.sorted() {
		if md.state() == Loading {
			m.startIfClear(md)
		}
	}
}

// reconcile runs when something may have freed: a draining model's last
// request ended, or the GPUs' memory changed.
func (m *Manager) reconcile() {
	for _, md := range m.sorted() {
		m.maybeStop(md)
	}
	m.schedule()
}

// tick applies the timeouts: drains that ran out, idle models, models
// whose settings changed; and retries placement, as memory may have come
// back.
func (m *Manager) tick(now time.Time) {
	for _, md := range m.sorted() {
		switch md.state() {
		case Stopped:
			m.forget(md)
		case Draining:
			m.maybeStop(md)
		case Ready:
			m.maybeProbe(md, now)
			idle := md.h.inflight.Load() == 0
			switch {
			case md.removed && idle:
				m.unload(md, "it was removed from the config")
			case md.stale() && idle:
				m.unload(md, "its settings changed")
			case idle && !m.keepLoaded(md) && !md.pinned:
				if t := m.cfg.InactivityOf(md.name); t > 0 && now.Sub(time.Unix(0, md.h.lastUsed.Load())) >= t {
					m.unload(md, "idle for "+t.String())
				}
			}
		}
	}
	m.schedule()
}

// sorted returns the models in name order, for deterministic loops.
func (m *Manager) sorted() []*model {
	out := make([]*model, 0, len(m.models))
	for _, md := range m.models {
		out = append(out, md)
	}
	slices.SortFunc(out, func(a, b *model) int { return strings.Compare(a.name, b.name) })
	return out
}

func (m *Manager) event(model, kind, detail string) { m.eventTook(model, kind, detail, 0) }

func (m *Manager) eventTook(model, kind, detail string, took time.Duration) {
	e := Event{Time: time.Now(), Model: model, Kind: kind, Detail: detail, Took: took}
	m.log.Info("model "+strings.ReplaceAll(kind, "_", " "), slog.String("model", model), slog.String("detail", detail))
	m.opts.OnEvent(e)
}

// adoptTimeout bounds one attempt to list the servers to adopt.
const adoptTimeout = 30 * time.Second

// adopt takes over the servers a previous vgw left running: those whose
// model is configured with the same launch settings are kept, and ready
// once their /health answers (one may still be loading); the rest are
// stopped. When the runtime cannot list them (Docker is down), it tries
// again in the background, so that what runs is adopted once it can be.
func (m *Manager) adopt(ctx context.Context) {
	actx, cancel := context.WithTimeout(ctx, adoptTimeout)
	insts, err := m.rt.Adopt(actx)
	cancel()
	if err != nil {
		m.log.Error("could not list running model servers to adopt; trying again", slog.String("error", err.Error()))
		go m.retryAdopt(ctx)
		return
	}
	m.adoptAll(insts)
}

// retryAdopt is a worker: it lists the servers to adopt until it can.
func (m *Manager) retryAdopt(ctx context.Context) {
	wait := time.Second
	for {
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return
		}
		actx, cancel := context.WithTimeout(ctx, adoptTimeout)
		insts, err := m.rt.Adopt(actx)
		cancel()
		if err == nil {
			m.do(func() { m.adoptAll(insts); m.schedule() })
			return
		}
		wait = min(2*wait, 30*time.Second)
	}
}

// adoptAll adopts or stops each server found running.
func (m *Manager) adoptAll(insts []*runtime.Instance) {
	for _, inst := range insts {
		md := m.models[inst.Model]
		if md != nil && md.inst != nil && md.inst.ID == inst.ID {
			continue // already ours: a start found it running
		}
		if md == nil || md.removed || md.launch != inst.Launch || md.inst != nil || md.state() != Stopped || inst.Addr == "" {
			m.log.Info("stopping a model server that does not match the config", slog.String("model", inst.Model), slog.String("id", inst.ID))
			go m.rt.Stop(m.ctx, inst, m.cfg.DrainTimeout.Std())
			continue
		}
		md.gpus = inst.GPUs
		md.perGPU, md.source = m.need(md)
		md.setState(Loading)
		m.claimGPUs(md.name, md.gpus) // it may still be starting: no neighbour starts meanwhile
		op := m.newLoadOp(md)
		op.adopted = true
		md.loading, md.inst = op, inst
		go m.resume(md, op, inst)
	}
}

// resume is a worker: it waits for an adopted server's /health as a load
// does, and stops the server if it never answers.
func (m *Manager) resume(md *model, op *loadOp, inst *runtime.Instance) {
	began := time.Now()
	err := m.waitHealthy(op, inst.Addr)
	if err == nil {
		m.do(func() { m.loadReady(md, op, time.Since(began), nil) })
		return
	}
	if m.ctx.Err() != nil {
		return // vgw is stopping: as in load
	}
	m.rt.Stop(context.Background(), inst, 0)
	m.do(func() { m.loadFailed(md, op, err) })
}

// watchGPUs is a worker: it reads GPU memory regularly, and pokes the loop
// when the reading changes, so that a model waiting for memory is placed
// as soon as it is there.
func (m *Manager) watchGPUs(ctx context.Context) {
	t := time.NewTicker(m.opts.GPUPoll)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-m.reread:
		case <-ctx.Done():
			return
		}
		before := m.reading.Load()
		m.readGPUs()
		if after := m.reading.Load(); before == nil || !slices.Equal(before.mem, after.mem) {
			m.pokeLoop()
		}
	}
}

func (m *Manager) readGPUs() {
	mem, err := m.inv.Memory()
	if err != nil {
		m.log.Warn("could not read GPU memory", slog.String("error", err.Error()))
		return
	}
	procs, err := m.inv.Processes()
	if err != nil {
		m.log.Warn("could not read GPU processes", slog.String("error", err.Error()))
	}
	m.reading.Store(&gpuReading{mem: mem, procs: procs})
}

// measure is a worker: once a model is ready and its memory has settled
// (two readings 250 ms apart within 1%), it records what the model really
// uses per GPU, under the signature of the settings its server runs: its
// processes' memory where the driver lists them, else the rise in its
// GPUs' used memory since before it started. That difference is trusted
// only when nothing else of vgw's started or stopped on those GPUs from
// settleTime before the load until the reading: a neighbour's memory may
// still be coming back, or going.
func (m *Manager) measure(name string, inst *runtime.Instance, op *loadOp, before []gpu.Memory) {
	var prev map[int]uint64
	for range 20 {
		cur, how := m.usage(inst, before)
		if len(cur) > 0 && settled(prev, cur) {
			if how == "delta" && !(op.calm && m.untouched(op)) {
				return
			}
			var total uint64
			for _, g := range op.gpus {
				total += cur[g]
			}
			// Tensor parallel: the footprint is per GPU (lesson 6).
			fp := Footprint{Signature: inst.Signature, PerGPU: total / uint64(len(op.gpus)), Measured: time.Now(), How: how}
			if err := m.fps.Put(name, fp); err != nil {
				m.log.Error("could not save footprints", slog.String("error", err.Error()))
			}
			return
		}
		prev = cur
		select {
		case <-time.After(250 * time.Millisecond):
		case <-m.closed:
			return
		}
	}
}

// untouched reports, from a worker, whether no start or stop but op's own
// has claimed op's GPUs since it did.
func (m *Manager) untouched(op *loadOp) bool {
	ok := false
	m.call(func() {
		ok = true
		for g, n := range op.ops {
			if m.gpuOps[g] != n {
				ok = false
			}
		}
	})
	return ok
}

// usage is what inst uses on each of its GPUs now, and how that was read.
func (m *Manager) usage(inst *runtime.Instance, before []gpu.Memory) (map[int]uint64, string) {
	cur := map[int]uint64{}
	pids := inst.PIDs
	if now, err := m.rt.PIDs(m.ctx, inst); err == nil {
		pids = now
	}
	if procs, err := m.inv.Processes(); err == nil {
		for _, p := range procs {
			if slices.Contains(pids, p.PID) {
				cur[p.GPU] += p.Used
			}
		}
	}
	if len(cur) > 0 {
		return cur, "processes"
	}
	mem, err := m.inv.Memory()
	if err != nil || len(before) != len(mem) {
		return nil, ""
	}
	for _, g := range inst.GPUs {
		if g < len(mem) && mem[g].Used > before[g].Used {
			cur[g] = mem[g].Used - before[g].Used
		}
	}
	return cur, "delta"
}

// listPIDs is a worker: it records the processes of a server that just
// became ready, so that its GPU memory is told from its neighbours'.
func (m *Manager) listPIDs(md *model, inst *runtime.Instance) {
	ctx, cancel := context.WithTimeout(m.ctx, 10*time.Second)
	defer cancel()
	pids, err := m.rt.PIDs(ctx, inst)
	if err != nil {
		m.log.Warn("could not list a model server's processes", slog.String("model", md.name), slog.String("error", err.Error()))
		return
	}
	m.do(func() { md.pids = instPIDs{inst, pids} })
}

// settled reports whether two readings agree within 1%.
func settled(prev, cur map[int]uint64) bool {
	if prev == nil || len(prev) != len(cur) {
		return false
	}
	for g, v := range cur {
		p := prev[g]
		if max(p, v)-min(p, v) > max(p, v)/100 {
			return false
		}
	}
	return true
}

// Signature identifies the settings that decide how much memory a model's
// server takes; a footprint learned under another signature is stale.
func Signature(c *config.Config, m *config.Model) string {
	b, _ := json.Marshal(struct {
		Image, Repo, Quantization, DType string
		MaxModelLen, MaxNumSeqs, TP      int
		Utilization                      float64
		ExtraArgs                        []string
	}{c.Runtime.Image, m.Repo, m.Quantization, m.DType, m.MaxModelLen, m.MaxNumSeqs, max(m.TensorParallelSize, 1), m.GPUMemoryUtilization, m.ExtraArgs})
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// LaunchSignature identifies everything a model's server is started with
// that the config decides: its memory settings (Signature), the runtime's
// network, cache, shared memory and env, the model's env and GPU pins. A
// server started otherwise is reloaded once idle, and not adopted.
func LaunchSignature(c *config.Config, m *config.Model) string {
	b, _ := json.Marshal(struct {
		Signature, Network, CacheDir string
		ShmSize                      int64
		RuntimeEnv, Env              map[string]string
		GPUs                         []int
	}{Signature(c, m), c.Runtime.Network, c.Runtime.CacheDir, int64(c.Runtime.ShmSize), c.Runtime.Env, m.Env, m.GPUs})
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
