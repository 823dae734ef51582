package xdstest

import (
	"errors"
	"net"
	"slices"
	"strconv"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/jonboulle/clockwork"
	"google.golang.org/protobuf/proto"
)

// clusterManager is the main thread's cluster manager
// (cluster_manager_impl.cc) and what it has posted to the workers. It is
// embedded in Client and guarded by its lock.
type clusterManager struct {
	active  map[string]*cluster // by name
	warming map[string]*cluster // new objects for names not yet warm
	// edsCache is the last assignment received for each EDS resource a
	// cluster watches: a cluster whose EDS does not come in time uses it
	// (grpc_mux_impl.cc processDiscoveryResources fills it; eds.cc
	// onConfigUpdateFailed reads it; the SotW ADS mux has it on).
	edsCache map[string]*endpointv3.ClusterLoadAssignment
	// workers is what the workers route by (see postToWorkers).
	workers map[string]*workerCluster
	// traffic marks the clusters the router has sent requests to: their
	// health checks run at interval, not no_traffic_interval.
	traffic map[string]bool

	cdsApplied  bool // the first CDS response has been applied
	initialized bool // ClusterManagerInitHelper's AllClustersInitialized
}

func (m *clusterManager) init() {
	m.active = map[string]*cluster{}
	m.warming = map[string]*cluster{}
	m.edsCache = map[string]*endpointv3.ClusterLoadAssignment{}
	m.workers = map[string]*workerCluster{}
	m.traffic = map[string]bool{}
}

// cluster is one cluster object: the active one of its name or a new
// version warming (cluster_manager_impl.cc ClusterData; upstream_impl.cc
// ClusterImplBase).
type cluster struct {
	cfg     *clusterv3.Cluster
	hosts   []*host // the main thread's host set, every priority in one
	stopped bool    // replaced or removed: its timers and checks are void

	// Initialisation: preInit ends with the first EDS (or its failure);
	// then, with health checks, each host's first check must end
	// (upstream_impl.cc onPreInitComplete, onInitDone).
	preInit       bool
	initDone      bool
	pendingChecks int
	fetchTimer    clockwork.Timer

	hc       *healthCheck // nil without health_checks
	sessions map[*host]*session

	// Health-only changes posted within update_merge_window of the last
	// post are merged (cluster_manager_impl.cc scheduleUpdate). The post
	// of a cluster as it warms does not count: zero until the first
	// change after it (clusterWarmingToActive drops the pending updates).
	lastPosted time.Time
	mergeTimer clockwork.Timer
}

// host is one upstream host of a cluster on the main thread.
type host struct {
	addr string
	eds  corev3.HealthStatus
	// failedActiveHC: a new host starts failing when the cluster has
	// health checks (upstream_impl.cc updateDynamicHostList).
	failedActiveHC bool
	// pendingRemoval: gone from EDS but kept while it passes its health
	// checks, unless ignore_health_on_host_removal.
	pendingRemoval bool
}

func (h *host) view() Host {
	return Host{Addr: h.addr, EDSHealth: h.eds, FailedActiveHC: h.failedActiveHC, PendingRemoval: h.pendingRemoval}
}

// Host is an upstream host, as a load balancer sees it.
type Host struct {
	Addr string
	// EDSHealth is the health_status EDS gave it.
	EDSHealth corev3.HealthStatus
	// FailedActiveHC says it has not passed an active health check since
	// it was added, or has failed them since.
	FailedActiveHC bool
	// PendingRemoval says EDS no longer lists it, but it is kept while it
	// passes its health checks.
	PendingRemoval bool
}

// health is a host's coarse health (upstream_impl.h coarseHealth).
type health int

const (
	healthy health = iota
	degraded
	unhealthy
)

func (h Host) coarse() health {
	switch {
	case h.FailedActiveHC, h.EDSHealth == corev3.HealthStatus_UNHEALTHY, h.EDSHealth == corev3.HealthStatus_TIMEOUT,
		h.EDSHealth == corev3.HealthStatus_DRAINING:
		return unhealthy
	case h.EDSHealth == corev3.HealthStatus_DEGRADED:
		return degraded
	}
	return healthy
}

// Healthy says a load balancer counts the host healthy.
func (h Host) Healthy() bool { return h.coarse() == healthy && !h.Excluded() }

// Excluded says a load balancer leaves the host out of its counts: EDS
// says it drains (upstream_impl.cc excludeBasedOnHealthFlag).
func (h Host) Excluded() bool { return h.EDSHealth == corev3.HealthStatus_DRAINING }

func (c *cluster) name() string { return c.cfg.GetName() }

// isEDS says the cluster's hosts come by EDS; other types take theirs
// from the cluster's own load_assignment.
func (c *cluster) isEDS() bool { return c.cfg.GetType() == clusterv3.Cluster_EDS }

// edsName is the EDS resource the cluster watches (eds.cc edsServiceName).
func (c *cluster) edsName() string {
	if n := c.cfg.GetEdsClusterConfig().GetServiceName(); n != "" {
		return n
	}
	return c.name()
}

// initialFetchTimeout is how long a warming cluster waits for its EDS:
// its eds_config's initial_fetch_timeout, 15 s by default, 0 for ever
// (config/utility.cc configSourceInitialFetchTimeout).
func (c *cluster) initialFetchTimeout() time.Duration {
	if t := c.cfg.GetEdsClusterConfig().GetEdsConfig().GetInitialFetchTimeout(); t != nil {
		return t.AsDuration()
	}
	return 15 * time.Second
}

// mergeWindow is update_merge_window, 1 s by default, 0 for none
// (cluster_manager_impl.cc onClusterInit).
func (c *cluster) mergeWindow() time.Duration {
	if w := c.cfg.GetCommonLbConfig().GetUpdateMergeWindow(); w != nil {
		return w.AsDuration()
	}
	return time.Second
}

// panicThreshold is healthy_panic_threshold in percent, 50 by default.
func (c *cluster) panicThreshold() float64 {
	if p := c.cfg.GetCommonLbConfig().GetHealthyPanicThreshold(); p != nil {
		return min(100, p.GetValue())
	}
	return 50
}

// edsNames are the EDS resources the clusters watch, active and warming.
func (m *clusterManager) edsNames() []string {
	seen := map[string]bool{}
	for _, cs := range []map[string]*cluster{m.active, m.warming} {
		for _, cl := range cs {
			if cl.isEDS() {
				seen[cl.edsName()] = true
			}
		}
	}
	return sortedKeys(seen)
}

// onClusters applies the clusters of a CDS response: state of the world,
// so a cluster left out is removed (cds_api_impl.cc onConfigUpdate;
// cds_api_helper.cc: adds and updates, then removals, with EDS paused so
// that one EDS request follows, before the CDS ACK).
func (c *Client) onClusters(clusters []*clusterv3.Cluster) {
	watchesChanged := false
	names := map[string]bool{}
	for _, cfg := range clusters {
		name := cfg.GetName()
		names[name] = true
		// An update equal to the warming version, or with none warming
		// to the active one, is skipped (cluster_manager_impl.cc
		// addOrUpdateCluster).
		if w := c.warming[name]; w != nil {
			if proto.Equal(w.cfg, cfg) {
				continue
			}
			c.stopCluster(w)
			watchesChanged = watchesChanged || w.isEDS()
		} else if a := c.active[name]; a != nil && proto.Equal(a.cfg, cfg) {
			continue
		}
		cl := &cluster{cfg: cfg, sessions: map[*host]*session{}}
		if len(cfg.GetHealthChecks()) > 0 {
			cl.hc = newHealthCheck(cfg.GetHealthChecks()[0])
		}
		c.warming[name] = cl
		c.updateClusterCounts()
		watchesChanged = watchesChanged || cl.isEDS()
		c.initialize(cl)
	}
	for _, name := range append(sortedKeys(c.active), sortedKeys(c.warming)...) {
		if !names[name] {
			watchesChanged = c.removeCluster(name) || watchesChanged
		}
	}
	c.cdsApplied = true
	// A resource no cluster watches leaves the cache (grpc_mux_impl.h
	// removeResourcesFromCache).
	watched := c.edsNames()
	for name := range c.edsCache {
		if !slices.Contains(watched, name) {
			delete(c.edsCache, name)
		}
	}
	if watchesChanged {
		c.subscribe(resource.EndpointType)
		c.queue(resource.EndpointType)
	}
	c.checkInitialized()
}

// initialize starts a new cluster object warming (upstream_impl.cc
// ClusterImplBase::initialize). An EDS cluster subscribes to its
// assignment and arms initial_fetch_timeout (grpc_subscription_impl.cc
// start); a static one has its hosts at once.
func (c *Client) initialize(cl *cluster) {
	if !cl.isEDS() {
		c.updateHosts(cl, cl.cfg.GetLoadAssignment())
		c.preInitComplete(cl)
		return
	}
	if d := cl.initialFetchTimeout(); d > 0 {
		cl.fetchTimer = c.after(d, func() { c.fetchTimedOut(cl) })
	}
}

// fetchTimedOut: a warming cluster's EDS did not come in time. It takes
// the assignment last received for its resource, if the cache has one (a
// changed cluster: the one its previous version had), else goes on with
// no hosts (eds.cc onConfigUpdateFailed, FetchTimedout).
func (c *Client) fetchTimedOut(cl *cluster) {
	if cl.stopped || cl.preInit {
		return
	}
	cl.fetchTimer = nil
	if la := c.edsCache[cl.edsName()]; la != nil {
		c.updateHosts(cl, la)
	}
	c.preInitComplete(cl)
}

// onEndpoints applies the assignments of an EDS response to the clusters
// that watch them. An assignment no cluster watches is ignored; a cluster
// whose assignment the response leaves out keeps its hosts
// (grpc_mux_impl.cc processDiscoveryResources: only the watches a
// response has resources for are updated). The newest cluster objects
// come first, as new watches are put first.
func (c *Client) onEndpoints(las map[string]*endpointv3.ClusterLoadAssignment) {
	var targets []*cluster
	for _, cs := range []map[string]*cluster{c.warming, c.active} {
		for _, name := range sortedKeys(cs) {
			if cl := cs[name]; cl.isEDS() && las[cl.edsName()] != nil {
				targets = append(targets, cl)
			}
		}
	}
	for _, cl := range targets {
		if cl.stopped {
			continue // replaced by its new version, which warmed just now
		}
		la := las[cl.edsName()]
		c.edsCache[cl.edsName()] = la
		if cl.fetchTimer != nil {
			cl.fetchTimer.Stop() // grpc_subscription_impl.cc onConfigUpdate
			cl.fetchTimer = nil
		}
		c.updateHosts(cl, la)
		c.preInitComplete(cl)
	}
}

// endpointsRejected: Envoy rejected an EDS response. Every EDS
// subscription is told, and a cluster still waiting for its first
// assignment goes on with the hosts it has (grpc_mux_impl.cc
// onDiscoveryResponse; eds.cc onConfigUpdateFailed: onPreInitComplete).
func (c *Client) endpointsRejected() {
	for _, name := range sortedKeys(c.warming) {
		cl := c.warming[name]
		if cl.stopped || !cl.isEDS() || cl.preInit {
			continue
		}
		if cl.fetchTimer != nil {
			cl.fetchTimer.Stop()
			cl.fetchTimer = nil
		}
		c.preInitComplete(cl)
	}
}

// updateHosts gives cl the hosts of la: a host already known keeps its
// health check state, a new one starts failing its active health check
// when the cluster has one; a host left out goes, unless health checks
// keep it (upstream_impl.cc updateDynamicHostList; eds.cc
// BatchUpdateHelper: duplicates after the first are dropped).
func (c *Client) updateHosts(cl *cluster, la *endpointv3.ClusterLoadAssignment) {
	byAddr := make(map[string]*host, len(cl.hosts))
	for _, h := range cl.hosts {
		byAddr[h.addr] = h
	}
	var final, added, removed []*host
	kept := map[*host]bool{}
	changed := false
	for _, l := range la.GetEndpoints() {
		for _, e := range l.GetLbEndpoints() {
			sa := e.GetEndpoint().GetAddress().GetSocketAddress()
			addr := net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue())))
			if h := byAddr[addr]; h != nil {
				if kept[h] {
					continue
				}
				kept[h] = true
				h.pendingRemoval = false
				if e.GetHealthStatus() != h.eds {
					before := h.view().coarse()
					h.eds = e.GetHealthStatus()
					changed = changed || before != h.view().coarse() // updateEdsHealthFlag
				}
				final = append(final, h)
				continue
			}
			if slices.ContainsFunc(added, func(h *host) bool { return h.addr == addr }) {
				continue
			}
			h := &host{addr: addr, eds: e.GetHealthStatus(), failedActiveHC: cl.hc != nil}
			final = append(final, h)
			added = append(added, h)
		}
	}
	for _, h := range cl.hosts {
		if kept[h] {
			continue
		}
		// With health checks a host still passing them stays until it
		// fails one, unless ignore_health_on_host_removal.
		if cl.hc != nil && !cl.cfg.GetIgnoreHealthOnHostRemoval() && !h.failedActiveHC &&
			h.eds != corev3.HealthStatus_UNHEALTHY && h.eds != corev3.HealthStatus_TIMEOUT {
			h.pendingRemoval = true
			final = append(final, h)
			continue
		}
		removed = append(removed, h)
	}
	cl.hosts = final
	if changed || len(added) > 0 || len(removed) > 0 {
		c.hostsChanged(cl, added, removed)
	}
}

// hostsChanged runs the priority set's callbacks: the health checker
// starts checking added hosts and stops checking removed ones, once it
// has started (health_checker_base_impl.cc onClusterMemberUpdate); an
// active cluster posts the change to the workers (cluster_manager_impl.cc
// onClusterInit's priority update callback).
func (c *Client) hostsChanged(cl *cluster, added, removed []*host) {
	if cl.hc != nil && cl.preInit {
		for _, h := range removed {
			c.stopSession(cl, h, true)
		}
		c.startSessions(cl, added)
	}
	if cl.initDone {
		c.scheduleUpdate(cl, len(added) == 0 && len(removed) == 0)
	}
}

// preInitComplete: the cluster has its first hosts (or will have none).
// Without health checks it is warm; with them its hosts are checked, and
// it is warm once each has had its first result (upstream_impl.cc
// onPreInitComplete, onInitDone; health_checker_base_impl.cc start).
func (c *Client) preInitComplete(cl *cluster) {
	if cl.preInit {
		return
	}
	cl.preInit = true
	if cl.hc != nil {
		c.startSessions(cl, cl.hosts)
		cl.pendingChecks = len(cl.hosts)
	}
	if cl.pendingChecks == 0 {
		c.finishInit(cl)
	}
}

// finishInit makes a warm cluster active, in place of the version before
// it, and posts it whole to the workers; the CDS pause ends with the last
// warming cluster (cluster_manager_impl.cc onClusterInit,
// clusterWarmingToActive, updateClusterCounts).
func (c *Client) finishInit(cl *cluster) {
	if cl.initDone || cl.stopped {
		return
	}
	cl.initDone = true
	name := cl.name()
	delete(c.warming, name)
	if old := c.active[name]; old != nil {
		c.stopCluster(old)
	}
	c.active[name] = cl
	c.updateClusterCounts()
	c.postToWorkers(cl)
	c.checkInitialized()
}

// removeCluster removes a cluster, active and warming; the workers drop
// it at once (cluster_manager_impl.cc removeCluster). It reports whether
// an EDS watch went with it.
func (c *Client) removeCluster(name string) bool {
	watched := false
	for _, cs := range []map[string]*cluster{c.active, c.warming} {
		if cl := cs[name]; cl != nil {
			c.stopCluster(cl)
			delete(cs, name)
			watched = watched || cl.isEDS()
		}
	}
	delete(c.workers, name)
	c.updateClusterCounts()
	return watched
}

// stopCluster voids a cluster object's timers and checks.
func (c *Client) stopCluster(cl *cluster) {
	cl.stopped = true
	for _, t := range []clockwork.Timer{cl.fetchTimer, cl.mergeTimer} {
		if t != nil {
			t.Stop()
		}
	}
	cl.fetchTimer, cl.mergeTimer = nil, nil
	for h := range cl.sessions {
		c.stopSession(cl, h, false)
	}
}

// stopAll ends every timer and check, as the client closes.
func (c *Client) stopAll() {
	for _, cs := range []map[string]*cluster{c.active, c.warming} {
		for _, cl := range cs {
			c.stopCluster(cl)
		}
	}
}

// checkInitialized moves the cluster manager out of its startup once the
// first CDS response is applied and every cluster has warmed
// (cluster_manager_impl.cc ClusterManagerInitHelper maybeFinishInitialize).
func (m *clusterManager) checkInitialized() {
	if !m.initialized && m.cdsApplied && len(m.warming) == 0 {
		m.initialized = true
	}
}

// updateClusterCounts pauses CDS while any cluster warms, once startup is
// over, so the CDS ACK waits for them; the last to warm resumes it and the
// pending request goes at once (cluster_manager_impl.cc
// updateClusterCounts; grpc_mux_impl.cc pause).
func (c *Client) updateClusterCounts() {
	if !c.initialized {
		return
	}
	api := c.api[resource.ClusterType]
	switch {
	case len(c.warming) > 0:
		api.paused = true
	case api.paused:
		api.paused = false
		if api.pending {
			api.pending = false
			c.queue(resource.ClusterType)
		}
	}
}

// scheduleUpdate posts a change of an active cluster's hosts to the
// workers: at once if it adds or removes hosts, or if update_merge_window
// has passed since the last post; else merged into one post when the
// window, counted from now, ends (cluster_manager_impl.cc scheduleUpdate,
// applyUpdates).
func (c *Client) scheduleUpdate(cl *cluster, mergeable bool) {
	window := cl.mergeWindow()
	if window <= 0 {
		c.postToWorkers(cl)
		return
	}
	now := c.clock.Now()
	outOfWindow := cl.lastPosted.IsZero() || now.Sub(cl.lastPosted).Milliseconds() > window.Milliseconds()
	if outOfWindow || !mergeable {
		if cl.mergeTimer != nil {
			cl.mergeTimer.Stop()
			cl.mergeTimer = nil
		}
		cl.lastPosted = now
		c.postToWorkers(cl)
		return
	}
	if cl.mergeTimer == nil {
		cl.mergeTimer = c.after(window, func() {
			if cl.stopped || cl.mergeTimer == nil {
				return
			}
			cl.mergeTimer = nil
			c.postToWorkers(cl)
			cl.lastPosted = c.clock.Now()
		})
	}
}

// workerCluster is a cluster as the workers have it.
type workerCluster struct {
	cfg            *clusterv3.Cluster
	hosts          []Host
	panicThreshold float64
}

// postToWorkers gives the workers cl as the main thread has it now
// (cluster_manager_impl.cc postThreadLocalClusterUpdate). In Envoy the
// post is applied by each worker soon after; here at once, which is when
// it is queued, before the request that acknowledges what caused it is
// written.
func (c *Client) postToWorkers(cl *cluster) {
	hosts := make([]Host, len(cl.hosts))
	for i, h := range cl.hosts {
		hosts[i] = h.view()
	}
	c.workers[cl.name()] = &workerCluster{cfg: cl.cfg, hosts: hosts, panicThreshold: cl.panicThreshold()}
}

// pick is the load balancer's choice of host, or false for none. It picks
// from the healthy hosts (then the degraded), unless too few are: under
// healthy_panic_threshold the cluster is in panic and every host is
// eligible, so a lone host failing its checks still gets the traffic
// (load_balancer_impl.cc isHostSetInPanic, hostSourceToUse; the
// availability is scaled by the default overprovisioning factor, 1.4).
// It takes the first eligible host: deterministic, where Envoy's
// least-request balancer would pick among equals at random.
func (w *workerCluster) pick() (Host, bool) {
	var healthyHosts, degradedHosts []Host
	excluded := 0
	for _, h := range w.hosts {
		switch {
		case h.Excluded():
			excluded++
		case h.coarse() == healthy:
			healthyHosts = append(healthyHosts, h)
		case h.coarse() == degraded:
			degradedHosts = append(degradedHosts, h)
		}
	}
	available := 0.0
	if n := len(w.hosts) - excluded; n > 0 {
		available = 100 * float64(len(healthyHosts)+len(degradedHosts)) / float64(n)
	}
	if min(100, 1.4*available) < 100 && available < w.panicThreshold {
		if len(w.hosts) == 0 {
			return Host{}, false
		}
		return w.hosts[0], true
	}
	switch {
	case len(healthyHosts) > 0:
		return healthyHosts[0], true
	case len(degradedHosts) > 0:
		return degradedHosts[0], true
	}
	return Host{}, false
}

// ErrClusterNotFound is Route's answer for a cluster the workers do not
// have: unknown, or new and still warming (router.cc: 503, flag NC).
var ErrClusterNotFound = errors.New("xdstest: cluster not found")

// ErrNoHealthyUpstream is Route's answer for a cluster with no host to
// pick (router.cc: 503 "no healthy upstream", flag UH).
var ErrNoHealthyUpstream = errors.New("xdstest: no healthy upstream")

// Route picks the host a request for cluster goes to, by the workers'
// view, as Envoy's router does; a pick counts as the cluster's traffic
// (its health checks then run at their interval, no longer at
// no_traffic_interval).
func (c *Client) Route(cluster string) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.workers[cluster]
	if w == nil {
		return "", ErrClusterNotFound
	}
	h, ok := w.pick()
	if !ok {
		return "", ErrNoHealthyUpstream
	}
	c.traffic[cluster] = true
	return h.Addr, nil
}

// Endpoints returns the hosts of cluster as the workers have them, which
// is where a request would be routed.
func (c *Client) Endpoints(cluster string) []string {
	return addrs(c.Hosts(cluster))
}

// Hosts returns the hosts of cluster as the workers have them.
func (c *Client) Hosts(cluster string) []Host {
	c.mu.Lock()
	defer c.mu.Unlock()
	if w := c.workers[cluster]; w != nil {
		return slices.Clone(w.hosts)
	}
	return nil
}

// Cluster returns the cluster the workers route by: nil while a new one
// warms, the version before while a changed one does.
func (c *Client) Cluster(name string) *clusterv3.Cluster {
	c.mu.Lock()
	defer c.mu.Unlock()
	if w := c.workers[name]; w != nil {
		return w.cfg
	}
	return nil
}

// MainEndpoints returns the hosts of the active cluster as the main thread
// has them; the workers may not have them yet.
func (c *Client) MainEndpoints(cluster string) []string {
	return addrs(c.MainHosts(cluster))
}

// MainHosts returns the hosts of the active cluster as the main thread has
// them.
func (c *Client) MainHosts(cluster string) []Host {
	c.mu.Lock()
	defer c.mu.Unlock()
	a := c.active[cluster]
	if a == nil {
		return nil
	}
	hosts := make([]Host, len(a.hosts))
	for i, h := range a.hosts {
		hosts[i] = h.view()
	}
	return hosts
}

// Warming says a new or changed version of cluster is warming.
func (c *Client) Warming(cluster string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.warming[cluster] != nil
}

func addrs(hosts []Host) []string {
	if hosts == nil {
		return nil
	}
	out := make([]string, len(hosts))
	for i, h := range hosts {
		out[i] = h.Addr
	}
	return out
}
