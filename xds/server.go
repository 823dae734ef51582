package xds

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/sotw/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
)

// Source is what the xDS server serves: every configured model, with the
// endpoints of its ready servers.
type Source interface {
	Models() []Model
}

// Server is vgw's ADS server.
type Server struct {
	src      Source
	settings Settings
	log      *slog.Logger
	cache    cache.SnapshotCache
	ads      serverv3.Server
	boot     string // tells this process's versions from a previous vgw's
	notify   chan struct{}
	force    atomic.Bool // the next publish bumps the version even if nothing changed

	// The lock guards the fields below. It is never held while sending,
	// building a snapshot or logging: state is copied out first.
	mu      sync.Mutex
	version uint64
	changed map[string]uint64 // cluster → version in which its endpoints last changed
	current map[string][]string
	streams map[int64]*adsStream
	nacks   []NACK
	wake    chan struct{} // closed and replaced on every change waiters care about
	// ready holds, per cluster, its published endpoints and whether every
	// connected Envoy knows them. The map is replaced, never changed, so
	// the request path reads it without the lock.
	ready atomic.Pointer[map[string]*atomic.Pointer[known]]

	last []Model // what the last snapshot was built from; owned by Run

	onNACK func(NACK) // see WithNACKHook
	pushes atomic.Uint64
	acks   atomic.Uint64
	nackN  atomic.Uint64

	// connected counts streams whose Envoy has said its node id; with none,
	// requests wait for an Envoy only until alone (unix nanos): vgw was
	// started, or its last Envoy left, NoEnvoyGrace before.
	connected atomic.Int32
	alone     atomic.Int64
}

// known is a cluster's published endpoints, and whether every connected
// Envoy has acknowledged them.
type known struct {
	endpoints []string // sorted
	acked     bool
}

// adsStream is one Envoy's ADS stream.
type adsStream struct {
	node   string
	acked  map[string]uint64 // type URL → version acknowledged (0: none of this process)
	nonces map[string]string // nonce → version sent with it
	order  []string          // nonces in the order sent, to forget old ones
}

// NACK is a version an Envoy rejected, and why.
type NACK struct {
	Time    time.Time
	Node    string
	TypeURL string
	Version string
	Error   string
}

// NodeStatus is what one Envoy has acknowledged.
type NodeStatus struct {
	Node     string
	Streams  int
	Clusters string // the CDS version acknowledged
	Routes   string // the EDS version acknowledged
	LastNACK *NACK
}

// group is the one key every Envoy's snapshot is stored under: all Envoys
// front the same models, so they are served the same snapshot, while their
// acknowledgements are tracked per node.
type group struct{}

func (group) ID(*corev3.Node) string { return "vgw" }

// An Option configures a Server.
type Option func(*Server)

// WithNACKHook has f told of every rejected version, off the lock.
func WithNACKHook(f func(NACK)) Option { return func(s *Server) { s.onNACK = f } }

// Counters are the server's totals since it started.
type Counters struct {
	Pushes uint64 // snapshots published
	ACKs   uint64
	NACKs  uint64
}

// Counters returns the server's totals.
func (s *Server) Counters() Counters {
	return Counters{Pushes: s.pushes.Load(), ACKs: s.acks.Load(), NACKs: s.nackN.Load()}
}

// New returns an xDS server for src.
func New(src Source, s Settings, log *slog.Logger, opts ...Option) *Server {
	b := make([]byte, 3)
	rand.Read(b)
	srv := &Server{
		src: src, settings: s, log: log,
		boot:    hex.EncodeToString(b),
		notify:  make(chan struct{}, 1),
		changed: map[string]uint64{},
		current: map[string][]string{},
		streams: map[int64]*adsStream{},
		wake:    make(chan struct{}),
	}
	srv.ready.Store(&map[string]*atomic.Pointer[known]{})
	srv.cache = cache.NewSnapshotCache(true, group{}, nil)
	// Ordered: a version's clusters reach an Envoy before their
	// assignments, so a cluster it warms again finds its EDS (the cache
	// orders an ADS node's watches; the option keeps one channel for them).
	srv.ads = serverv3.NewServer(context.Background(), srv.cache, serverv3.CallbackFuncs{
		StreamOpenFunc:     srv.streamOpen,
		StreamClosedFunc:   srv.streamClosed,
		StreamRequestFunc:  srv.streamRequest,
		StreamResponseFunc: srv.streamResponse,
	}, sotw.WithOrderedADS())
	srv.alone.Store(time.Now().Add(s.NoEnvoyGrace).UnixNano())
	for _, o := range opts {
		o(srv)
	}
	return srv
}

// Register adds the ADS service to g.
func (s *Server) Register(g *grpc.Server) {
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, s.ads)
}

// Notify asks for a new snapshot: the models or their servers changed. It
// never blocks; changes that come while one is being built are folded
// into the next.
func (s *Server) Notify() {
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// Republish makes the next snapshot a new version even if nothing
// changed, so that every Envoy is sent the config again: after an Envoy
// rejected a version, once its cause is fixed.
func (s *Server) Republish() {
	s.force.Store(true)
	s.Notify()
}

// Run publishes a first snapshot, then a new one after every Notify, until
// ctx ends.
func (s *Server) Run(ctx context.Context) {
	s.publish(ctx)
	for {
		select {
		case <-s.notify:
			s.publish(ctx)
		case <-ctx.Done():
			return
		}
	}
}

// publish builds and sets the next snapshot, unless nothing changed since
// the last: a new version costs every Envoy a round of work.
func (s *Server) publish(ctx context.Context) {
	models := normalise(s.src.Models())
	if !s.force.Swap(false) && s.last != nil && slices.EqualFunc(models, s.last, sameModel) {
		return
	}
	s.mu.Lock()
	s.version++
	v := s.version
	s.mu.Unlock()
	version := s.boot + "-" + strconv.FormatUint(v, 10)
	snap, err := Build(version, models, s.settings)
	if err != nil {
		s.log.Error("xDS snapshot not built", slog.String("version", version), slog.String("error", err.Error()))
		return
	}
	s.last = models
	// Record what changed before Envoys can acknowledge it.
	s.mu.Lock()
	seen := map[string]bool{}
	for _, m := range models {
		eps := m.Endpoints
		seen[m.Cluster] = true
		if !slices.Equal(eps, s.current[m.Cluster]) {
			s.current[m.Cluster] = eps
			s.changed[m.Cluster] = v
		}
	}
	if ready := *s.ready.Load(); len(ready) != len(models) || slices.ContainsFunc(models, func(m Model) bool { return ready[m.Cluster] == nil }) {
		next := make(map[string]*atomic.Pointer[known], len(models))
		for _, m := range models {
			if f := ready[m.Cluster]; f != nil {
				next[m.Cluster] = f
			} else {
				next[m.Cluster] = new(atomic.Pointer[known])
			}
		}
		s.ready.Store(&next)
	}
	for c := range s.current {
		if !seen[c] {
			delete(s.current, c)
			delete(s.changed, c)
		}
	}
	s.refreshLocked()
	s.mu.Unlock()
	if err := s.cache.SetSnapshot(ctx, "vgw", snap); err != nil {
		s.log.Error("xDS snapshot not set", slog.String("version", version), slog.String("error", err.Error()))
		return
	}
	s.pushes.Add(1)
	if s.log.Enabled(ctx, slog.LevelDebug) {
		s.log.LogAttrs(ctx, slog.LevelDebug, "xDS snapshot published", slog.String("version", version), slog.Int("clusters", len(models)))
	}
}

// normalise sorts models by cluster and each one's endpoints.
func normalise(ms []Model) []Model {
	out := make([]Model, len(ms))
	for i, m := range ms {
		m.Endpoints = slices.Clone(m.Endpoints)
		slices.Sort(m.Endpoints)
		out[i] = m
	}
	slices.SortFunc(out, func(a, b Model) int { return strings.Compare(a.Cluster, b.Cluster) })
	return out
}

func sameModel(a, b Model) bool {
	return a.Cluster == b.Cluster && a.MaxConcurrent == b.MaxConcurrent && slices.Equal(a.Endpoints, b.Endpoints)
}

// parse reads a version of this process's; 0 for another's or none.
func (s *Server) parse(version string) uint64 {
	boot, n, ok := strings.Cut(version, "-")
	if !ok || boot != s.boot {
		return 0
	}
	v, _ := strconv.ParseUint(n, 10, 64)
	return v
}

func (s *Server) streamOpen(_ context.Context, id int64, _ string) error {
	s.mu.Lock()
	s.streams[id] = &adsStream{acked: map[string]uint64{}, nonces: map[string]string{}}
	s.mu.Unlock()
	return nil
}

func (s *Server) streamClosed(id int64, node *corev3.Node) {
	s.mu.Lock()
	if st := s.streams[id]; st != nil && st.node != "" {
		if s.connected.Add(-1) == 0 {
			s.alone.Store(time.Now().Add(s.settings.NoEnvoyGrace).UnixNano())
		}
	}
	delete(s.streams, id)
	s.refreshLocked()
	s.mu.Unlock()
	s.log.Info("Envoy disconnected from xDS", slog.String("node", node.GetId()))
}

// streamRequest records an Envoy's ACK or NACK. After a NACK, Envoy asks
// again with the version it still runs; the cache would answer that at once
// with the rejected version, and Envoy would reject it again, in a loop. So
// the request is marked as having seen the rejected version: the next
// answer comes with the next snapshot.
func (s *Server) streamRequest(id int64, req *discoverygrpc.DiscoveryRequest) error {
	s.mu.Lock()
	st := s.streams[id]
	if st == nil {
		s.mu.Unlock()
		return nil
	}
	first := st.node == "" && req.GetNode().GetId() != ""
	if first {
		// A new Envoy knows nothing yet: clusters are no longer known to
		// every connected Envoy until it acknowledges them.
		st.node = req.GetNode().GetId()
		s.connected.Add(1)
		s.refreshLocked()
	}
	var nack *NACK
	switch {
	case req.GetErrorDetail() != nil:
		version := st.nonces[req.GetResponseNonce()]
		nack = &NACK{Time: time.Now(), Node: st.node, TypeURL: req.GetTypeUrl(), Version: version, Error: req.GetErrorDetail().GetMessage()}
		s.nacks = append(s.nacks, *nack)
		if len(s.nacks) > 100 {
			s.nacks = s.nacks[1:]
		}
		if version != "" {
			req.VersionInfo = version
		}
	case req.GetResponseNonce() != "":
		st.acked[req.GetTypeUrl()] = s.parse(req.GetVersionInfo())
		s.acks.Add(1)
		s.refreshLocked()
	}
	node := st.node
	s.mu.Unlock()
	if first {
		s.log.Info("Envoy connected to xDS", slog.String("node", node), slog.String("version_info", req.GetVersionInfo()))
	}
	if nack != nil {
		s.nackN.Add(1)
		if s.onNACK != nil {
			s.onNACK(*nack)
		}
		s.log.Error("Envoy rejected an xDS update", slog.String("node", nack.Node), slog.String("type", nack.TypeURL),
			slog.String("version", nack.Version), slog.String("error", nack.Error))
	}
	return nil
}

func (s *Server) streamResponse(_ context.Context, id int64, _ *discoverygrpc.DiscoveryRequest, resp *discoverygrpc.DiscoveryResponse) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.streams[id]
	if st == nil {
		return
	}
	st.nonces[resp.GetNonce()] = resp.GetVersionInfo()
	st.order = append(st.order, resp.GetNonce())
	if len(st.order) > 32 {
		delete(st.nonces, st.order[0])
		st.order = st.order[1:]
	}
}

// refreshLocked recomputes which clusters every connected Envoy knows the
// current endpoints of, and wakes the waiters. s.mu is held.
func (s *Server) refreshLocked() {
	for cluster, k := range *s.ready.Load() {
		k.Store(&known{endpoints: s.current[cluster], acked: s.ackedLocked("", cluster)})
	}
	close(s.wake)
	s.wake = make(chan struct{})
}

// ackedLocked reports whether node (every connected node, for "") has
// acknowledged the EDS version that holds cluster's current endpoints.
// With no such node connected, nothing is known: false.
func (s *Server) ackedLocked(node, cluster string) bool {
	need := s.changed[cluster]
	found := false
	for _, st := range s.streams {
		if st.node == "" || (node != "" && st.node != node) {
			continue
		}
		found = true
		if st.acked[resource.EndpointType] < need {
			return false
		}
	}
	return found
}

// Acked reports whether addr is among cluster's published endpoints and
// every connected Envoy has acknowledged them. It is the request path's
// check: two atomic loads and a search of a short list.
func (s *Server) Acked(cluster, addr string) bool {
	if s.connected.Load() == 0 {
		// No Envoy on xDS: wait only within the grace after the last left.
		return time.Now().UnixNano() >= s.alone.Load()
	}
	k := (*s.ready.Load())[cluster]
	if k == nil {
		return false
	}
	kn := k.Load()
	return kn != nil && kn.acked && slices.Contains(kn.endpoints, addr)
}

// WaitAcked returns once the address addr gives (the model's server, which
// may move while the request waits) has been published as one of cluster's
// endpoints and node's Envoy (every connected Envoy, for "") has
// acknowledged the version holding it, so that a request released now is
// routed where the model runs. An Envoy learns of new hosts when it applies
// an EDS update, before it acknowledges it (grpc_mux_impl.cc), and posts
// them to its workers right away (cluster_manager_impl.cc); WaitAcked
// allows applyGrace more for that.
//
// When no Envoy in question is connected, it waits until NoEnvoyGrace has
// passed since vgw started or the last Envoy left, then returns nil: with
// no Envoy on xDS (one with a static config, say) there is nothing to wait
// for, and the request is better sent than held. addr returning "" means
// the model is no longer ready: ErrGone.
func (s *Server) WaitAcked(ctx context.Context, node, cluster string, addr func() string) error {
	for {
		a := addr()
		if a == "" {
			return ErrGone
		}
		s.mu.Lock()
		connected := false
		for _, st := range s.streams {
			connected = connected || (st.node != "" && (node == "" || st.node == node))
		}
		published := slices.Contains(s.current[cluster], a)
		ok := published && connected && s.ackedLocked(node, cluster)
		wake := s.wake
		s.mu.Unlock()
		if ok {
			return sleep(ctx, applyGrace)
		}
		var giveUp <-chan time.Time
		if published && !connected {
			until := time.Until(time.Unix(0, s.alone.Load()))
			if until <= 0 {
				return nil
			}
			t := time.NewTimer(until)
			defer t.Stop()
			giveUp = t.C
		}
		select {
		case <-wake:
		case <-giveUp: // looked at again: the Envoy may have connected meanwhile
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// applyGrace is how long an Envoy may take, after it acknowledged an EDS
// update, to have its worker threads route by it (ENVOY-FACTS,
// contradiction 1).
const applyGrace = time.Millisecond

// ErrGone is WaitAcked's answer when the model stopped while it waited.
var ErrGone = errors.New("the model's server went away while the request waited for Envoy")

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Status reports every connected Envoy and the recent NACKs.
func (s *Server) Status() ([]NodeStatus, []NACK) {
	s.mu.Lock()
	defer s.mu.Unlock()
	byNode := map[string]*NodeStatus{}
	for _, st := range s.streams {
		if st.node == "" {
			continue
		}
		ns := byNode[st.node]
		if ns == nil {
			ns = &NodeStatus{Node: st.node}
			byNode[st.node] = ns
		}
		ns.Streams++
		// With several streams from one node, report the furthest.
		if v := s.versionString(st.acked[resource.ClusterType]); s.parse(v) > s.parse(ns.Clusters) {
			ns.Clusters = v
		}
		if v := s.versionString(st.acked[resource.EndpointType]); s.parse(v) > s.parse(ns.Routes) {
			ns.Routes = v
		}
	}
	for i := range s.nacks {
		if ns := byNode[s.nacks[i].Node]; ns != nil {
			n := s.nacks[i]
			ns.LastNACK = &n
		}
	}
	out := make([]NodeStatus, 0, len(byNode))
	for _, ns := range byNode {
		out = append(out, *ns)
	}
	slices.SortFunc(out, func(a, b NodeStatus) int { return strings.Compare(a.Node, b.Node) })
	return out, slices.Clone(s.nacks)
}

func (s *Server) versionString(v uint64) string {
	if v == 0 {
		return ""
	}
	return fmt.Sprintf("%s-%d", s.boot, v)
}

// Version is the last version published.
func (s *Server) Version() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.versionString(s.version)
}
