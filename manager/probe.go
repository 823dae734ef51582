package manager

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/vgw-project/vgw/manager/runtime"
)

// A ready model's server can stop answering without exiting: a vLLM
// that deadlocked, was stopped (SIGSTOP), or lost its GPU stays up, so
// Docker reports no death, while its requests hang until Envoy's stream
// idle timeout and its queue times out behind them. So the loop probes
// each ready server's /health every probe_interval. After probe_failures
// failures in a row the model is unhealthy: it is taken out of service
// (Envoy loses its endpoint), drained, stopped without grace, and started
// again, and requests for it wait for the new server.

// maybeProbe starts a health probe of md's server when one is due; the
// result comes back to the loop (probed).
func (m *Manager) maybeProbe(md *model, now time.Time) {
	p := m.cfg.ProbeOf(md.name)
	if p.Interval <= 0 || md.probing || md.inst == nil {
		return
	}
	// A reload may have shortened the interval since this was set.
	if due := now.Add(p.Interval); md.nextProbe.After(due) {
		md.nextProbe = due
	}
	if now.Before(md.nextProbe) {
		return
	}
	md.probing = true
	inst := md.inst
	go func() {
		err := m.healthy(m.ctx, inst.Addr, p.Timeout)
		m.do(func() { m.probed(md, inst, err) })
	}()
}

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

// probed takes a probe's result. A probe of a server that has since gone
// (stopped, crashed, replaced) counts for nothing.
func (m *Manager) probed(md *model, inst *runtime.Instance, err error) {
	p := m.cfg.ProbeOf(md.name)
	md.probing = false
	md.nextProbe = time.Now().Add(p.Interval)
	if md.inst != inst || md.state() != Ready {
		return
	}
	if err == nil {
		if md.probeFailures > 0 {
			m.log.Info("model answers its health probes again", slog.String("model", md.name), slog.Int("failed", md.probeFailures))
		}
		md.probeFailures, md.failures = 0, 0 // it has served: earlier failures are over
		return
	}
	md.probeFailures++
	if md.probeFailures < p.Failures {
		m.log.Warn("model failed a health probe", slog.String("model", md.name), slog.String("error", err.Error()),
			slog.Int("failed", md.probeFailures), slog.Int("of", p.Failures))
		return
	}
	why := fmt.Sprintf("%d health probes in a row failed, the last: %v", md.probeFailures, err)
	m.log.Error("model is unhealthy: taking it out of service and restarting it", slog.String("model", md.name),
		slog.String("instance", inst.ID), slog.String("error", why))
	md.unhealthy, md.restart = true, true
	md.failures++ // a restart after this is backed off if it does not last (stopped)
	md.lastErr = fmt.Errorf("unhealthy: %s", why)
	m.event(md.name, EventUnhealthy, why+"; restarting it")
	m.unload(md, "it is unhealthy")
}
