package manager

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/vgw-project/vgw/manager/runtime"
	"github.com/vgw-project/vgw/manager/runtime/vllm"
)

// The sleep tier (config sleep: level1 or level2): a model leaving its
// GPUs may be put to sleep in its running server rather than stopped,
// which gives back all of its GPU memory but a residual (the CUDA context
// and graph pool, about 1.2-1.4 GiB at TP=1), and at level 1 moves its
// weights to host memory. Woken, it serves again in seconds rather than
// the minutes of a cold start. A sleeping model's server is never sent
// requests (Envoy has no endpoint for it), never put to sleep with
// requests in flight (that has killed vLLM, vllm#28714), and a wake that
// fails starts it again cold.
//
// Its states: Ready, then Draining with sleepTo set, then (its requests
// done, its GPUs' starts and stops serialised as for a stop) Sleeping;
// then, wanted again and placed, Waking, then Ready. Placement counts a
// sleeper's residual on its GPUs and its host memory against
// host_memory (place.go).

// sleepInfo is a sleeping model's server: the level it sleeps at (0: not
// known, as for a sleeper adopted from an earlier vgw), what it keeps of
// each of its GPUs and of host memory, and since when.
type sleepInfo struct {
	level    int
	residual uint64
	host     uint64
	since    time.Time
}

// asleep reports whether md's server sleeps (or is waking, or being
// stopped from its sleep).
func (md *model) asleep() bool { return !md.sleep.since.IsZero() }

// residualOnly reports whether md's server holds only its residual of its
// GPUs: asleep, or being stopped from its sleep; not waking, whose
// memory is spoken for from the wake's start.
func (md *model) residualOnly() bool { return md.asleep() && md.state != Waking }

// sleepSeen is what md's server was measured to keep asleep: of each of
// its GPUs, and of host memory at each level (by level), 0 when not yet
// measured.
type sleepSeen struct {
	residual uint64
	host     [3]uint64
	hostSeen [3]bool
}

// DefaultResidual is the GPU memory a sleeping server is foreseen to keep
// on each of its GPUs until one has been measured: a little above the 1.2
// to 1.4 GiB vLLM 0.11 keeps at TP=1 (the vLLM blog's "sleep mode" post).
const DefaultResidual = 1536 << 20

// sleepLevel is the level md may sleep at now: its setting, when the
// runtime can put servers to sleep and md's server runs the settings
// configured (one started before sleep mode was turned on cannot sleep);
// 0 when it must stop.
func (s *scheduler) sleepLevel(md *model) int {
	if !s.canSleep || md.removed || md.stale() || md.cfg.AlwaysOn {
		return 0
	}
	return s.cfg.SleepFor(md.cfg).Level()
}

// foreseen is what md is expected to keep asleep at level: what it was
// measured to keep, else DefaultResidual of each GPU and, at level 1,
// its whole footprint in host memory (its weights are less than that,
// but not known before a first sleep), and none at level 2.
func (s *scheduler) foreseen(md *model, level int) (residual, host uint64) {
	kept, ok := s.fps.Get(md.name, md.sig) // measured by an earlier vgw
	if !ok {
		kept = Footprint{}
	}
	residual = cmp.Or(md.seen.residual, kept.Residual, DefaultResidual)
	residual = min(residual, md.place.perGPU)
	switch {
	case md.seen.hostSeen[level]:
		host = md.seen.host[level]
	case level == 1 && kept.HostLevel1 > 0:
		host = kept.HostLevel1
	case level == 2:
		host = kept.HostLevel2
	case level == 1:
		host = md.place.perGPU * uint64(max(len(md.place.gpus), 1))
	}
	return residual, host
}

// hostBudget is the host memory sleeping models may hold.
func (s *scheduler) hostBudget() uint64 { return s.cfg.HostMemory.Budget(s.hostTotal) }

// drain takes a ready model out of service to stop it (sleepTo 0) or put
// it to sleep at level sleepTo once its requests are done.
func (s *scheduler) drain(now time.Time, md *model, reason string, sleepTo int) {
	// Published before the count is read: see Manager.TryLease.
	s.setState(md, Draining)
	s.publish()
	md.sleepTo = sleepTo
	md.drainBy = now.Add(s.cfg.DrainTimeout.Std())
	if sleepTo > 0 {
		reason += fmt.Sprintf("; to sleep at level %d", sleepTo)
	}
	s.event(now, md.name, EventDraining, fmt.Sprintf("%s; %d in flight", reason, md.use.inflight.Load()), 0)
	s.maybeStop(now, md)
}

// retire takes a ready model off its GPUs when nothing needs its room:
// to sleep, if it can and host memory has room (made by stopping older
// sleepers), else stopped.
func (s *scheduler) retire(now time.Time, md *model, reason string) {
	if level := s.sleepLevel(md); level > 0 && s.sleepInRoom(now, md, reason, level) {
		return
	}
	s.unload(now, md, reason)
}

// sleepInRoom drains md to sleep at level when host memory has room for
// it, stopping first the older sleepers that make it (SleepOrStop); it
// reports false, and does nothing, when there is none.
func (s *scheduler) sleepInRoom(now time.Time, md *model, reason string, level int) bool {
	stop, ok := SleepOrStop(s.snapshot(now), md.name)
	if !ok {
		return false
	}
	for _, name := range stop {
		if v := s.models[name]; v != nil {
			s.unload(now, v, "to make host memory for "+md.name)
		}
	}
	md.sleepAfter = stop
	s.drain(now, md, reason, level)
	return true
}

// slept takes the end of a sleep: md's server sleeps, keeping residual
// of each GPU and host of host memory, or the sleep failed (err), or an
// unload came meanwhile. In the last two it is stopped.
func (s *scheduler) slept(now time.Time, md *model, level int, gpus []int, residual, host uint64, err error) {
	for _, g := range gpus {
		s.lastStop[g] = now
	}
	if err != nil || md.stopAfter {
		if err != nil {
			s.note(slog.LevelError, "model did not fall asleep; stopping it", slog.String("model", md.name), slog.String("error", err.Error()))
		} else {
			// Asleep until it has stopped: what it holds stays counted.
			md.sleep = sleepInfo{level: level, residual: residual, host: host, since: now}
		}
		md.sleepTo, md.stopAfter = 0, false
		s.emit(stopServer{md: md, inst: md.inst, gpus: gpus, grace: s.cfg.DrainTimeout.Std()}) // md.stopping stays set
		return
	}
	md.stopping, md.sleepTo = false, 0
	md.sleep = sleepInfo{level: level, residual: residual, host: host, since: now}
	md.seen.residual = residual
	md.seen.host[level], md.seen.hostSeen[level] = host, true
	s.emit(saveSleep{model: md.name, signature: md.inst.Signature, level: level, residual: residual, host: host})
	s.setState(md, Sleeping)
	s.event(now, md.name, EventSleeping, fmt.Sprintf("level %d; keeps %s of each of GPUs %v and %s of host memory",
		level, gib(int64(residual)), md.place.gpus, gib(int64(host))), 0)
	s.emit(rereadGPUs{})
	s.freeGPUs(now, md.name, gpus)
	if len(md.liveWaiters()) > 0 || s.held(md, now) {
		s.enqueue(md) // wanted as it fell asleep: woken
	}
	s.schedule(now)
}

// sleepAsked is an operator's sleep of a ready model: at its level, if
// host memory has room; an error says why not.
func (s *scheduler) sleepAsked(now time.Time, name string) error {
	var err error
	oerr := s.operate(name, false, func(md *model) {
		level := s.sleepLevel(md)
		switch {
		case md.state == Sleeping:
			return
		case md.state != Ready:
			err = fmt.Errorf("%w: model %s is %s, not ready", ErrCannotSleep, name, md.state)
		case level == 0 && !s.canSleep:
			err = fmt.Errorf("%w: the runtime cannot put servers to sleep", ErrCannotSleep)
		case level == 0 && md.cfg.AlwaysOn:
			err = fmt.Errorf("%w: model %s is always_on", ErrCannotSleep, name)
		case level == 0 && md.stale():
			err = fmt.Errorf("%w: model %s's server was started without sleep mode; it restarts with it once idle", ErrCannotSleep, name)
		case level == 0:
			err = fmt.Errorf("%w: model %s has sleep: off", ErrCannotSleep, name)
		case s.sleepInRoom(now, md, "asked to", level):
			md.keepUntil = time.Time{}
		default:
			_, need := s.foreseen(md, level)
			err = fmt.Errorf("%w: host_memory has no room for model %s's %s (%s of %s in use)", ErrCannotSleep, name,
				gib(int64(need)), gib(int64(s.snapshot(now).hostUsed())), gib(int64(s.hostBudget())))
		}
	})
	if oerr != nil {
		return oerr
	}
	return err
}

// wakeAsked is an operator's wake of a sleeping model, as a load is.
func (s *scheduler) wakeAsked(now time.Time, name string) error {
	var err error
	oerr := s.operate(name, false, func(md *model) {
		switch md.state {
		case Sleeping:
			s.enqueue(md)
			md.keepUntil = now.Add(s.cfg.LoadTimeout.Std())
			s.schedule(now)
		case Waking, Ready:
		default:
			err = fmt.Errorf("%w: model %s is %s", ErrNotAsleep, name, md.state)
		}
	})
	if oerr != nil {
		return oerr
	}
	return err
}

// Errors of an operator's sleep and wake.
var (
	ErrCannotSleep = errors.New("cannot put the model to sleep")
	ErrNotAsleep   = errors.New("the model is not asleep")
)

// wakeFailed takes a wake that failed: the executor has stopped the
// server, and md, Stopped now, is started again cold for its waiters,
// with no backoff: the wake's failure says nothing of a load.
func (s *scheduler) wakeFailed(now time.Time, md *model, op *loadOp, err error) {
	// loadFailed has marked its GPUs as just stopped.
	s.note(slog.LevelWarn, "model did not wake; starting it again", slog.String("model", md.name), slog.String("error", err.Error()))
	s.event(now, md.name, EventWakeFailed, err.Error()+"; starting it again", 0)
	if len(md.liveWaiters()) > 0 || s.held(md, now) {
		s.enqueue(md)
	}
	s.freeGPUs(now, md.name, op.gpus)
	s.forget(md)
	s.schedule(now)
}

// adoptedAsleep takes an adopted server that answered its health check
// asleep: a previous vgw put it to sleep, at a level not known now (it
// is woken as level 2 is, which wakes either), foreseen to hold what its
// configured level would.
func (s *scheduler) adoptedAsleep(now time.Time, md *model, op *loadOp) {
	if md.loading != op {
		return
	}
	if op.cancelled && op.readded {
		op.cancelled = false // back in the config: it stays, as in loaded
	}
	md.loading = nil
	residual, host := s.foreseen(md, max(s.cfg.SleepFor(md.cfg).Level(), 1))
	md.sleep = sleepInfo{residual: residual, host: host, since: now}
	s.setState(md, Sleeping)
	s.event(now, md.name, EventSleeping, "adopted "+md.inst.ID+" asleep", 0)
	s.emit(listPIDs{md: md, inst: md.inst})
	s.freeGPUs(now, md.name, op.gpus)
	if op.cancelled {
		s.answerAll(md, fmt.Errorf("model %s: %w", md.name, ErrUnloaded))
		s.unload(now, md, "asked to while it was adopted")
		return
	}
	if len(md.liveWaiters()) > 0 || s.held(md, now) {
		s.enqueue(md)
	}
	s.schedule(now)
}

// exitedBeforeWake takes the exit of a sleeper whose wake waits for room:
// placed already, it is started cold there instead, its waiters waiting
// on.
func (s *scheduler) exitedBeforeWake(now time.Time, md *model, e runtime.Exit) {
	s.note(slog.LevelWarn, "a sleeping model's server exited before its wake; starting it again",
		slog.String("model", md.name), slog.String("reason", e.Reason))
	s.event(now, md.name, EventCrashed, fmt.Sprintf("asleep, %s, code %d; starting it again", e.Reason, e.Code), 0)
	md.inst, md.sleep = nil, sleepInfo{}
	for _, g := range md.place.gpus {
		s.lastStop[g] = now // its residual is coming back as the cold start begins
	}
	s.setState(md, Loading)
	s.emit(rereadGPUs{})
	s.startIfClear(now, md)
}

// progressed takes what a loading server's log says of its start: shown
// in the View, and told as a progress event at each new phase and each
// tenth of one.
func (s *scheduler) progressed(now time.Time, md *model, op *loadOp, p vllm.Progress) {
	if md.loading != op {
		return
	}
	prev, seen := op.progress, op.seen
	op.progress, op.seen = p, true
	s.dirty = true
	if seen && p.Phase == prev.Phase && int(p.Percent)/10 == int(prev.Percent)/10 {
		return
	}
	detail := p.Phase.String()
	if p.Percent >= 0 {
		detail += fmt.Sprintf(" %.0f%%", p.Percent)
	}
	if md.took.load > 0 {
		left := max(md.took.load-now.Sub(op.began), 0)
		detail += fmt.Sprintf("; about %v left, as its last load took %v", left.Round(time.Second), md.took.load.Round(time.Second))
	}
	s.event(now, md.name, EventProgress, detail, 0)
}

// viewState is md's state as a View shows it: Failed for a model stopped
// after a failed load.
func (md *model) viewState() State {
	if md.state == Stopped && md.backoff.lastLoad != nil {
		return Failed
	}
	return md.state
}
