package manager

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/vgw-project/vgw/manager/runtime"
)

// A ready model's server can stop answering without exiting: a vLLM
// that deadlocked, was stopped (SIGSTOP), or lost its GPU stays up, so
// the runtime reports no death, while its requests hang until Envoy's
// stream idle timeout and its queue times out behind them. So the
// scheduler has each ready server's /health probed every probe_interval.
// After probe_failures failures in a row the model is unhealthy: it is
// taken out of service (Envoy loses its endpoint), drained, stopped
// without grace, and started again, and requests for it wait for the new
// server.

// maybeProbe has md's server probed when a probe is due; the result comes
// back as probed.
func (s *scheduler) maybeProbe(now time.Time, md *model) {
	p := s.cfg.ProbeOf(md.name)
	if p.Interval <= 0 || md.health.probing || md.inst == nil {
		return
	}
	// A reload may have shortened the interval since this was set.
	if due := now.Add(p.Interval); md.health.next.After(due) {
		md.health.next = due
	}
	if now.Before(md.health.next) {
		return
	}
	md.health.probing = true
	s.emit(probeServer{md: md, inst: md.inst, timeout: p.Timeout})
}

// probed takes a probe's result. A probe of a server that has since gone
// (stopped, crashed, replaced) counts for nothing.
func (s *scheduler) probed(now time.Time, md *model, inst *runtime.Instance, err error) {
	p := s.cfg.ProbeOf(md.name)
	md.health.probing = false
	md.health.next = now.Add(p.Interval)
	if md.inst != inst || md.state != Ready {
		return
	}
	if err == nil {
		if md.health.failures > 0 {
			s.note(slog.LevelInfo, "model answers its health probes again", slog.String("model", md.name), slog.Int("failed", md.health.failures))
		}
		md.health.failures, md.backoff.failures = 0, 0 // it has served: earlier failures are over
		return
	}
	md.health.failures++
	if md.health.failures < p.Failures {
		s.note(slog.LevelWarn, "model failed a health probe", slog.String("model", md.name), slog.String("error", err.Error()),
			slog.Int("failed", md.health.failures), slog.Int("of", p.Failures))
		return
	}
	why := fmt.Sprintf("%d health probes in a row failed, the last: %v", md.health.failures, err)
	s.note(slog.LevelError, "model is unhealthy: taking it out of service and restarting it", slog.String("model", md.name),
		slog.String("instance", inst.ID), slog.String("error", why))
	md.health.unhealthy, md.health.restart = true, true
	md.backoff.failures++ // a restart after this is backed off if it does not last (stopped)
	md.backoff.lastErr = fmt.Errorf("unhealthy: %s", why)
	s.event(now, md.name, EventUnhealthy, why+"; restarting it", 0)
	s.unload(now, md, "it is unhealthy")
}
