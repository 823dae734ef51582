package xdstest

import (
	"context"
	"net"
	"net/http"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/jonboulle/clockwork"
)

// healthCheck is a cluster's active health check: its first, the only
// one vgw configures. HTTP checks GET the path; any other kind is played
// as a TCP connect.
type healthCheck struct {
	cfg                         *corev3.HealthCheck
	timeout                     time.Duration
	interval, unhealthyInterval time.Duration
	healthyEdge, unhealthyEdge  time.Duration
	noTraffic, noTrafficHealthy time.Duration
	healthyThreshold            uint32
	unhealthyThreshold          uint32
}

// newHealthCheck reads cfg with Envoy's defaults
// (health_checker_base_impl.cc HealthCheckerImplBase). Jitter is left
// out: vgw sets none.
func newHealthCheck(cfg *corev3.HealthCheck) *healthCheck {
	orDefault := func(d interface{ AsDuration() time.Duration }, def time.Duration, set bool) time.Duration {
		if set {
			return d.AsDuration()
		}
		return def
	}
	hc := &healthCheck{
		cfg:                cfg,
		timeout:            cfg.GetTimeout().AsDuration(),
		interval:           cfg.GetInterval().AsDuration(),
		healthyThreshold:   cfg.GetHealthyThreshold().GetValue(),
		unhealthyThreshold: cfg.GetUnhealthyThreshold().GetValue(),
	}
	hc.noTraffic = orDefault(cfg.GetNoTrafficInterval(), 60*time.Second, cfg.GetNoTrafficInterval() != nil)
	hc.noTrafficHealthy = orDefault(cfg.GetNoTrafficHealthyInterval(), hc.noTraffic, cfg.GetNoTrafficHealthyInterval() != nil)
	hc.unhealthyInterval = orDefault(cfg.GetUnhealthyInterval(), hc.interval, cfg.GetUnhealthyInterval() != nil)
	hc.unhealthyEdge = orDefault(cfg.GetUnhealthyEdgeInterval(), hc.unhealthyInterval, cfg.GetUnhealthyEdgeInterval() != nil)
	hc.healthyEdge = orDefault(cfg.GetHealthyEdgeInterval(), hc.interval, cfg.GetHealthyEdgeInterval() != nil)
	return hc
}

// transition is what a check result did to a host's health
// (HealthTransition).
type transition int

const (
	unchanged transition = iota
	changed
	changePending // on its way to a change, short of the threshold
)

// failure is how a check failed (envoy.data.core.v3.HealthCheckFailureType).
type failure int

const (
	activeFailure  failure = iota // the host answered, not as expected
	networkFailure                // it could not be reached
	networkTimeout                // no answer within the check's timeout
)

// session is the checking of one host (health_checker_base_impl.cc
// ActiveHealthCheckSession).
type session struct {
	host                     *host
	first                    bool // no result yet
	numHealthy, numUnhealthy uint32
	seq                      int // counts checks, to drop a late result
	stopped                  bool
	interval, timeout        clockwork.Timer
	cancel                   context.CancelFunc // the check under way
}

// startSessions starts checking hosts: each one's first check runs at
// once, as initial_jitter is 0 (health_checker_base_impl.cc addHosts,
// ActiveHealthCheckSession::start, onInitialInterval).
func (c *Client) startSessions(cl *cluster, hosts []*host) {
	for _, h := range hosts {
		if cl.sessions[h] != nil {
			continue
		}
		s := &session{host: h, first: true}
		cl.sessions[h] = s
		c.runCheck(cl, s)
	}
}

// stopSession stops checking h. A host removed before its first result
// counts as checked for the cluster's warming (onDeferredDeleteBase runs
// the callbacks), when counted says so.
func (c *Client) stopSession(cl *cluster, h *host, counted bool) {
	s := cl.sessions[h]
	if s == nil {
		return
	}
	delete(cl.sessions, h)
	s.stopped = true
	c.endCheck(s)
	if s.interval != nil {
		s.interval.Stop()
	}
	if counted && s.first {
		c.checkComplete(cl, h, unchanged)
	}
}

// endCheck ends the check under way, if any.
func (c *Client) endCheck(s *session) {
	if s.cancel != nil {
		s.cancel()
		s.cancel = nil
	}
	if s.timeout != nil {
		s.timeout.Stop()
		s.timeout = nil
	}
}

// runCheck checks s's host once: a real request to it, bounded by the
// check's timeout on the client's clock (onIntervalBase, onTimeoutBase).
func (c *Client) runCheck(cl *cluster, s *session) {
	s.seq++
	seq := s.seq
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.timeout = c.after(cl.hc.timeout, func() { c.checkDone(cl, s, seq, networkTimeout, false) })
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		f, ok := c.probe(ctx, cl, s.host.addr)
		c.post(func() { c.checkDone(cl, s, seq, f, ok) })
	}()
}

// probe performs a check: an HTTP GET of the check's path, passed by an
// expected status (200 by default), failed by any other as an active
// failure and by no answer as a network one (health_checker_impl.cc
// HttpActiveHealthCheckSession onInterval, healthCheckResult); or a TCP
// connect for other kinds.
func (c *Client) probe(ctx context.Context, cl *cluster, addr string) (failure, bool) {
	hhc := cl.hc.cfg.GetHttpHealthCheck()
	if hhc == nil {
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return networkFailure, false
		}
		conn.Close()
		return 0, true
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+hhc.GetPath(), nil)
	if err != nil {
		return activeFailure, false
	}
	req.Host = hhc.GetHost()
	if req.Host == "" {
		req.Host = cl.name()
	}
	req.Header.Set("User-Agent", "Envoy/HC")
	resp, err := c.http.Do(req)
	if err != nil {
		return networkFailure, false
	}
	resp.Body.Close()
	ranges := hhc.GetExpectedStatuses()
	if len(ranges) == 0 {
		return activeFailure, resp.StatusCode == http.StatusOK
	}
	for _, r := range ranges {
		if int64(resp.StatusCode) >= r.GetStart() && int64(resp.StatusCode) < r.GetEnd() {
			return 0, true
		}
	}
	return activeFailure, false
}

// checkDone takes a check's result, unless the check is no longer the
// session's (it timed out, or the host went).
func (c *Client) checkDone(cl *cluster, s *session, seq int, f failure, ok bool) {
	if s.stopped || cl.stopped || s.seq != seq || s.cancel == nil {
		return
	}
	c.endCheck(s)
	if ok {
		c.handleSuccess(cl, s)
	} else {
		c.handleFailure(cl, s, f)
	}
}

// handleSuccess: a failing host passes once it has passed
// healthy_threshold checks in a row, or at once on its first check
// (health_checker_base_impl.cc handleSuccess: first_check_).
func (c *Client) handleSuccess(cl *cluster, s *session) {
	s.numUnhealthy = 0
	t := unchanged
	if s.host.failedActiveHC {
		if s.first || inc(&s.numHealthy) == cl.hc.healthyThreshold {
			s.host.failedActiveHC = false
			t = changed
		} else {
			t = changePending
		}
	}
	c.checkEnded(cl, s, true, t)
}

// handleFailure: a passing host fails at once on an answer that is not
// the expected one, or after unhealthy_threshold network failures in a
// row (health_checker_base_impl.cc setUnhealthy).
func (c *Client) handleFailure(cl *cluster, s *session, f failure) {
	s.numHealthy = 0
	t := unchanged
	if !s.host.failedActiveHC {
		if f == activeFailure || inc(&s.numUnhealthy) == cl.hc.unhealthyThreshold {
			s.host.failedActiveHC = true
			t = changed
		} else {
			t = changePending
		}
	}
	c.checkEnded(cl, s, false, t)
}

// checkEnded ends a check: the cluster hears its result and, unless the
// host is gone, the next check is timed by whether it passed.
func (c *Client) checkEnded(cl *cluster, s *session, passed bool, t transition) {
	s.first = false
	c.checkComplete(cl, s.host, t)
	if !s.stopped {
		s.interval = c.after(c.interval(cl, passed, t), func() {
			if !s.stopped && !cl.stopped {
				c.runCheck(cl, s)
			}
		})
	}
}

// inc increments *n and returns it, as ++n in a condition that Envoy
// short-circuits.
func inc(n *uint32) uint32 {
	*n++
	return *n
}

// checkComplete runs the callbacks of a check result: the cluster
// reloads its healthy hosts when a host's health changed, then counts the
// result for its warming (upstream_impl.cc reloadHealthyHosts, onInitDone's
// callback).
func (c *Client) checkComplete(cl *cluster, h *host, t transition) {
	if t == changed && cl.initDone {
		c.reloadHealthyHosts(cl, h)
	}
	if cl.pendingChecks > 0 {
		cl.pendingChecks--
		if cl.pendingChecks == 0 {
			c.finishInit(cl)
		}
	}
}

// reloadHealthyHosts posts a health change: a host gone from EDS that now
// fails goes, else it is a health-only update, merged within
// update_merge_window (eds.cc reloadHealthyHostsHelper).
func (c *Client) reloadHealthyHosts(cl *cluster, h *host) {
	if h.failedActiveHC && h.pendingRemoval {
		for i, x := range cl.hosts {
			if x == h {
				cl.hosts = append(cl.hosts[:i:i], cl.hosts[i+1:]...)
				break
			}
		}
		c.hostsChanged(cl, nil, []*host{h})
		return
	}
	c.hostsChanged(cl, nil, nil)
}

// interval is when s's host is checked next: every interval once the
// cluster has had traffic, else every no_traffic_interval, with the edge
// intervals while a change is pending (health_checker_base_impl.cc
// interval).
func (c *Client) interval(cl *cluster, passed bool, t transition) time.Duration {
	hc := cl.hc
	var d time.Duration
	switch {
	case !c.traffic[cl.name()] && passed && t != changePending:
		d = hc.noTrafficHealthy
	case !c.traffic[cl.name()]:
		d = hc.noTraffic
	case !passed && t == changePending:
		d = hc.unhealthyEdge
	case !passed:
		d = hc.unhealthyInterval
	case t == changePending:
		d = hc.healthyEdge
	default:
		d = hc.interval
	}
	return max(d, time.Millisecond)
}
