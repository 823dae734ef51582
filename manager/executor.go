package manager

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/vgw-project/vgw/manager/gpu"
	"github.com/vgw-project/vgw/manager/runtime"
	"github.com/vgw-project/vgw/manager/runtime/vllm"
)

// The executor is the Manager's part that acts on the scheduler's
// decisions. Everything here runs on the loop goroutine, except the
// workers (the functions so named, and the goroutines execute starts for
// stops, probes and footprint saves), which do the slow I/O and report
// back to the scheduler through Manager.do.

// An action is something the scheduler decided and the executor carries
// out.
type action interface{ isAction() }

type (
	// startServer starts md's server for op and waits for it to be
	// healthy: started, then loaded or loadFailed.
	startServer struct {
		md   *model
		op   *loadOp
		spec runtime.Spec
	}
	// resumeServer waits for an adopted server to be healthy, as a load
	// does: loaded or loadFailed.
	resumeServer struct {
		md   *model
		op   *loadOp
		inst *runtime.Instance
		// sleepMode says it was started in sleep mode: it may be asleep.
		sleepMode bool
	}
	// wakeServer wakes md's sleeping server for op and waits for it to
	// be healthy: loaded or loadFailed, as a load.
	wakeServer struct {
		md   *model
		op   *loadOp
		inst *runtime.Instance
	}
	// sleepServer puts md's server to sleep at level and measures what
	// it keeps: slept.
	sleepServer struct {
		md      *model
		inst    *runtime.Instance
		level   int
		gpus    []int
		timeout time.Duration
	}
	// cancelLoad ends a load under way; it reports as loadFailed.
	cancelLoad struct{ op *loadOp }
	// stopServer stops inst, gracefully for up to grace: stopped, for a
	// model's server (md set); nothing for a server no model has.
	stopServer struct {
		md    *model
		inst  *runtime.Instance
		gpus  []int
		grace time.Duration
	}
	// probeServer checks a ready server's health once: probed.
	probeServer struct {
		md      *model
		inst    *runtime.Instance
		timeout time.Duration
	}
	// measureServer measures what a ready server uses once its memory
	// has settled: measured.
	measureServer struct {
		model  string
		inst   *runtime.Instance
		op     *loadOp
		before []gpu.Memory
	}
	// listPIDs lists a ready server's processes: listed.
	listPIDs struct {
		md   *model
		inst *runtime.Instance
	}
	// rereadGPUs reads the GPUs' memory now: after a server stops, its
	// memory shows free as soon as the driver says.
	rereadGPUs struct{}
	// saveFootprint records what a model was measured to use awake.
	saveFootprint struct {
		model string
		fp    Footprint
	}
	// saveSleep records what a model's server was measured to keep
	// asleep at level, under signature.
	saveSleep struct {
		model, signature string
		level            int
		residual, host   uint64
	}
	// tell tells the operator of a lifecycle change: the log, and
	// Options.OnEvent.
	tell struct{ e Event }
	// answer replies to a waiter the scheduler has answered (and, for a
	// lease, counted in): with model as the latest View shows it.
	answer struct {
		w     *waiter
		model string
		err   error
	}
	// logLine logs a line.
	logLine struct {
		level slog.Level
		msg   string
		attrs []slog.Attr
	}
)

func (startServer) isAction()   {}
func (resumeServer) isAction()  {}
func (wakeServer) isAction()    {}
func (sleepServer) isAction()   {}
func (cancelLoad) isAction()    {}
func (stopServer) isAction()    {}
func (probeServer) isAction()   {}
func (measureServer) isAction() {}
func (listPIDs) isAction()      {}
func (rereadGPUs) isAction()    {}
func (saveFootprint) isAction() {}
func (saveSleep) isAction()     {}
func (tell) isAction()          {}
func (answer) isAction()        {}
func (logLine) isAction()       {}

// send replies to the waiter; the View it names the model by is the one
// published for the decision, or a later one.
func (a answer) send(b *board) {
	r := reply{err: a.err}
	if a.err == nil {
		r.m = b.view().Model(a.model)
	}
	a.w.reply <- r
}

// act carries out what the scheduler has decided.
func (m *Manager) act() {
	for _, a := range m.s.take() {
		m.execute(a)
	}
}

func (m *Manager) execute(a action) {
	switch a := a.(type) {
	case startServer:
		ctx := m.loadContext(a.op)
		go m.load(ctx, a.md, a.op, a.spec)
	case resumeServer:
		ctx := m.loadContext(a.op)
		go m.resume(ctx, a)
	case wakeServer:
		ctx := m.loadContext(a.op)
		go m.wake(ctx, a.md, a.op, a.inst)
	case sleepServer:
		go m.sleep(a)
	case cancelLoad:
		if cancel := m.cancels[a.op]; cancel != nil {
			cancel()
		}
	case stopServer:
		go func() {
			err := m.rt.Stop(m.ctx, a.inst, a.grace)
			if a.md != nil {
				m.do(func(now time.Time) { m.s.stopped(now, a.md, a.gpus, err) })
			}
		}()
	case probeServer:
		go func() {
			err := m.healthy(m.ctx, a.inst.Addr, a.timeout)
			m.do(func(now time.Time) { m.s.probed(now, a.md, a.inst, err) })
		}()
	case measureServer:
		go m.measure(a)
	case listPIDs:
		go m.listPIDs(a.md, a.inst)
	case rereadGPUs:
		select {
		case m.reread <- struct{}{}:
		default:
		}
	case saveFootprint:
		go m.saveFootprint(a.model, a.fp.Signature, func(fp *Footprint) {
			fp.PerGPU, fp.Measured, fp.How = a.fp.PerGPU, a.fp.Measured, a.fp.How
		})
	case saveSleep:
		go m.saveFootprint(a.model, a.signature, func(fp *Footprint) {
			fp.Residual = a.residual
			if a.level == 1 {
				fp.HostLevel1 = a.host
			} else {
				fp.HostLevel2 = a.host
			}
		})
	case tell:
		m.log.Info("model "+strings.ReplaceAll(a.e.Kind, "_", " "), slog.String("model", a.e.Model), slog.String("detail", a.e.Detail))
		m.opts.OnEvent(a.e)
	case answer:
		a.send(m.board)
	case logLine:
		m.log.LogAttrs(m.ctx, a.level, a.msg, a.attrs...)
	}
}

// saveFootprint is a worker: it changes a model's footprint as change
// says, and writes the file.
func (m *Manager) saveFootprint(model, signature string, change func(*Footprint)) {
	if err := m.fps.Update(model, signature, change); err != nil {
		m.log.Error("could not save footprints", slog.String("error", err.Error()))
	}
}

// loadContext gives a load its context, which ends at load_timeout or
// when the load is cancelled.
func (m *Manager) loadContext(op *loadOp) context.Context {
	ctx, cancel := context.WithTimeout(m.ctx, op.limit)
	m.cancels[op] = cancel
	return ctx
}

// end forgets a load's context once the scheduler has heard how it ended.
func (m *Manager) end(op *loadOp) {
	if cancel := m.cancels[op]; cancel != nil {
		cancel()
		delete(m.cancels, op)
	}
}

// load is a worker: it starts the server and polls its health. When the
// load fails it stops the server itself before reporting, so the GPUs the
// load claimed are free only once nothing of it runs.
func (m *Manager) load(ctx context.Context, md *model, op *loadOp, spec runtime.Spec) {
	began := m.clock.Now()
	before, _ := m.inv.Memory() // for measuring by difference; see measured
	since := time.Now()         // the log's clock, not the loop's (a test's may be fake)
	inst, err := m.rt.Start(ctx, spec)
	if err == nil {
		m.do(func(time.Time) { m.s.started(md, op, inst) })
		m.followProgress(ctx, md, op, inst, since)
		err = m.waitHealthy(ctx, op, inst.Addr)
	}
	if err == nil && m.sleeper != nil && spec.Sleep.Level() > 0 {
		// The first request after a load in sleep mode is slow: made
		// here, it is no client's. Its failure fails nothing.
		if werr := m.sleeper.WarmUp(ctx, inst, spec); werr != nil {
			m.log.Warn("the warm-up request after a load failed", slog.String("model", md.name), slog.String("error", werr.Error()))
		}
	}
	m.finish(md, op, inst, began, before, err)
}

// finish reports how a load, a resume or a wake ended, with how long it
// took since began: ready, or failed, its server (if it got one) stopped
// first, so the GPUs the op claimed are free only once nothing of it
// runs. While vgw stops it reports nothing and stops nothing: the server
// goes on, for the next vgw to adopt.
func (m *Manager) finish(md *model, op *loadOp, inst *runtime.Instance, began time.Time, before []gpu.Memory, err error) {
	if err == nil {
		took := m.clock.Since(began)
		m.do(func(now time.Time) { m.end(op); m.s.loaded(now, md, op, took, before) })
		return
	}
	if m.ctx.Err() != nil {
		return
	}
	if inst != nil {
		m.rt.Stop(context.Background(), inst, 0) // it never served since: nothing to drain
	}
	m.do(func(now time.Time) { m.end(op); m.s.loadFailed(now, md, op, err) })
}

// resume is a worker: it waits for an adopted server's /health as a load
// does, and stops the server if it never answers.
func (m *Manager) resume(ctx context.Context, a resumeServer) {
	md, op, inst := a.md, a.op, a.inst
	began := m.clock.Now()
	m.followProgress(ctx, md, op, inst, time.Now()) // not the old log of a server long up
	err := m.waitHealthy(ctx, op, inst.Addr)
	if err == nil && a.sleepMode && m.sleeper != nil {
		// A previous vgw may have put it to sleep: it answers /health
		// asleep, and would answer requests 503. Not known is not awake.
		asleep, serr := m.sleeper.IsSleeping(ctx, inst)
		switch {
		case serr != nil:
			err = fmt.Errorf("could not tell whether it sleeps: %w", serr)
		case asleep:
			m.do(func(now time.Time) { m.end(op); m.s.adoptedAsleep(now, md, op) })
			return
		}
	}
	m.finish(md, op, inst, began, nil, err)
}

// followProgress follows a loading server's log from since, where the
// runtime can, until the load's ctx ends, and tells the scheduler each new
// phase and each new whole percent of it (vllm.ParseProgress).
func (m *Manager) followProgress(ctx context.Context, md *model, op *loadOp, inst *runtime.Instance, since time.Time) {
	f, ok := m.rt.(LogFollower)
	if !ok {
		return
	}
	go func() {
		last := vllm.Progress{Percent: -2}
		err := f.FollowLog(ctx, inst, since, func(line string) {
			p, ok := vllm.ParseProgress(line)
			if !ok || (p.Phase == last.Phase && int(p.Percent) == int(last.Percent)) {
				return
			}
			last = p
			m.doCtx(ctx, func(now time.Time) { m.s.progressed(now, md, op, p) })
		})
		if err != nil && ctx.Err() == nil {
			m.log.Debug("could not follow a loading server's log", slog.String("model", md.name), slog.String("error", err.Error()))
		}
	}()
}

// wake is a worker: it wakes a sleeping server and waits for its health
// as a load does. A wake that fails stops the server, which the
// scheduler then starts again cold (wakeFailed).
func (m *Manager) wake(ctx context.Context, md *model, op *loadOp, inst *runtime.Instance) {
	began := m.clock.Now()
	err := m.sleeper.Wake(ctx, inst, op.level)
	if err == nil {
		err = m.waitHealthy(ctx, op, inst.Addr)
	}
	m.finish(md, op, inst, began, nil, err)
}

// sleep is a worker: it puts a drained server to sleep, then measures
// what it keeps of its GPUs (its processes' memory, where the driver
// lists them) and of host memory (the runtime's reading), each falling
// back to what was foreseen.
func (m *Manager) sleep(a sleepServer) {
	ctx, cancel := context.WithTimeout(m.ctx, a.timeout)
	defer cancel()
	// What sleeping adds to the server's host memory is what it holds
	// asleep: the weights, at level 1. Its own (Python, CUDA, buffers),
	// which it holds awake too, the budget leaves to the reserve.
	before, hostErr := m.sleeper.HostMemory(ctx, a.inst)
	err := m.sleeper.Sleep(ctx, a.inst, a.level)
	var residual, host uint64
	if err == nil {
		if cur, how := m.usage(a.inst, nil); how == "processes" {
			for _, g := range a.gpus {
				residual = max(residual, cur[g])
			}
		}
		if hostErr == nil { // without the reading before, the rise is not known
			var after uint64
			if after, hostErr = m.sleeper.HostMemory(ctx, a.inst); hostErr == nil {
				host = after - min(before, after)
			}
		}
	}
	m.do(func(now time.Time) {
		fr, fh := m.s.foreseen(a.md, a.level)
		if residual == 0 {
			residual = fr
		}
		if hostErr != nil && err == nil {
			m.log.Warn("could not read a sleeping server's host memory; counting what was foreseen",
				slog.String("model", a.md.name), slog.String("error", hostErr.Error()))
			host = fh
		}
		m.s.slept(now, a.md, a.level, a.gpus, residual, host, err)
	})
}

// waitHealthy polls GET /health until it answers 200, each poll within
// op.poll: every 2 ms at first, backing off to every 5 ms, so a server is
// seen ready at most 5 ms after it is. vLLM opens its HTTP port only once
// its engine is up, so while it loads a poll is a refused connection: no
// request, no access-log line; once up, the first poll finds it ready.
func (m *Manager) waitHealthy(ctx context.Context, op *loadOp, addr string) error {
	wait := 2 * time.Millisecond
	for {
		if m.healthy(ctx, addr, op.poll) == nil {
			return nil
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("%w %v", ErrLoadTimeout, op.limit)
			}
			return ctx.Err()
		}
		wait = min(wait*3/2+time.Millisecond, healthPollMax)
	}
}

// healthPollMax is the longest pause between health polls.
const healthPollMax = 5 * time.Millisecond

// healthy is one GET /health of a server, which must answer 200 within
// timeout: a load's health check (waitHealthy) and a ready server's probe.
// It runs on a worker.
func (m *Manager) healthy(ctx context.Context, addr string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/health", nil)
	if err != nil {
		return err
	}
	resp, err := m.health.Do(req)
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return fmt.Errorf("no answer to GET /health within %v", timeout)
	case err != nil:
		return fmt.Errorf("GET /health: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /health answered %s", resp.Status)
	}
	return nil
}

// adoptTimeout bounds one attempt to list the servers to adopt.
const adoptTimeout = 30 * time.Second

// adopt lists the servers a previous vgw left running, for the scheduler
// to adopt. When the runtime cannot list them (Docker is down), it tries
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
	m.s.adopted(insts)
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
			m.do(func(now time.Time) { m.s.adopted(insts); m.s.schedule(now) })
			return
		}
		wait = min(2*wait, 30*time.Second)
	}
}

// watchGPUs is a worker: it reads GPU memory regularly, and tells the
// scheduler when the reading changes, so that a model waiting for memory
// is placed as soon as it is there.
func (m *Manager) watchGPUs(ctx context.Context) {
	t := time.NewTicker(m.opts.GPUPoll)
	defer t.Stop()
	var last *gpuReading
	for {
		select {
		case <-t.C:
		case <-m.reread:
		case <-ctx.Done():
			return
		}
		r := m.readGPUs()
		if r == nil || (last != nil && slices.Equal(last.mem, r.mem)) {
			continue
		}
		last = r
		m.do(func(now time.Time) { m.s.gpusRead(now, r) })
	}
}

// readGPUs reads the GPUs' memory and processes; nil when it cannot.
func (m *Manager) readGPUs() *gpuReading {
	mem, err := m.inv.Memory()
	if err != nil {
		m.log.Warn("could not read GPU memory", slog.String("error", err.Error()))
		return nil
	}
	procs, err := m.inv.Processes()
	if err != nil {
		m.log.Warn("could not read GPU processes", slog.String("error", err.Error()))
	}
	return &gpuReading{mem: mem, procs: procs}
}

// measure is a worker: once a model is ready and its memory has settled
// (two readings 250 ms apart within 1%), it reports what the model's
// server uses per GPU, for the scheduler to judge (measured).
func (m *Manager) measure(a measureServer) {
	var prev map[int]uint64
	for range 20 {
		cur, how := m.usage(a.inst, a.before)
		if len(cur) > 0 && settled(prev, cur) {
			var total uint64
			for _, g := range a.op.gpus {
				total += cur[g]
			}
			// Tensor parallel: the footprint is per GPU (lesson 6).
			fp := Footprint{Signature: a.inst.Signature, PerGPU: total / uint64(len(a.op.gpus)), Measured: m.clock.Now(), How: how}
			m.do(func(time.Time) { m.s.measured(a.model, a.op, fp) })
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

// listPIDs is a worker: it lists the processes of a server that just
// became ready, so that its GPU memory is told from its neighbours'.
func (m *Manager) listPIDs(md *model, inst *runtime.Instance) {
	ctx, cancel := context.WithTimeout(m.ctx, 10*time.Second)
	defer cancel()
	pids, err := m.rt.PIDs(ctx, inst)
	if err != nil {
		m.log.Warn("could not list a model server's processes", slog.String("model", md.name), slog.String("error", err.Error()))
		return
	}
	m.do(func(time.Time) { m.s.listed(md, inst, pids) })
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
