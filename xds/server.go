package xds

import (
	"cmp"
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

	"github.com/vgw-project/vgw/manager"
)

// Source is what the xDS server serves: the manager's latest View of the
// models, whose Changed channel says when to look again.
type Source interface {
	View() *manager.View
}

// ClusterName is the Envoy cluster that serves a model: the name that
// ext_proc's x-vgw-cluster header carries.
func ClusterName(model string) string { return "model/" + model }

// modelsOf is what Envoy's config needs of a View: a cluster for every
// configured model, with its server's address while it is ready.
func modelsOf(v *manager.View) []Model {
	out := make([]Model, 0, len(v.Models))
	for _, mv := range v.Models {
		if mv.Removed {
			continue
		}
		m := Model{Name: mv.Name, Cluster: ClusterName(mv.Name), MaxConcurrent: mv.Limits.MaxConcurrent}
		if mv.Endpoint != "" {
			m.Endpoints = []string{mv.Endpoint}
		}
		out = append(out, m)
	}
	return out
}

// Server is vgw's ADS server.
type Server struct {
	src      Source
	settings Settings
	log      *slog.Logger
	cache    cache.SnapshotCache
	ads      serverv3.Server
	boot     string        // tells this process's versions from a previous vgw's
	again    chan struct{} // Republish asks for a new version
	force    atomic.Bool   // the next publish bumps the version even if nothing changed

	// The lock guards the fields below. It is never held while sending,
	// building a snapshot or logging: state is copied out first.
	mu      sync.Mutex
	version uint64
	changed map[string]uint64   // model → version in which its endpoints last changed
	current map[string][]string // model → its published endpoints
	streams map[int64]*adsStream
	nacks   []NACK
	// alone is when requests stop waiting for an Envoy while none is
	// connected: NoEnvoyGrace after vgw started, or after its last Envoy
	// left.
	alone time.Time
	// Nodes that have had an xDS stream, and nodes seen on ext_proc that
	// never had one (warned about once each).
	seenNodes map[string]bool
	strangers map[string]bool

	// acks is the one record of who acknowledged what, rebuilt under mu
	// whenever it changes (refreshLocked) and read without it.
	acks atomic.Pointer[ackTable]

	last []Model // what the last snapshot was built from; owned by Run

	onNACK func(NACK) // see Options.OnNACK
	pushes atomic.Uint64
	ackN   atomic.Uint64
	nackN  atomic.Uint64
}

// adsStream is one Envoy's ADS stream.
type adsStream struct {
	node   string
	acked  map[string]uint64 // type URL → version acknowledged (0: none of this process)
	sent   map[string]uint64 // type URL → latest version sent
	nacked map[string]uint64 // type URL → latest version rejected
	nonces map[string]string // nonce → version sent with it
	order  []string          // nonces in the order sent, to forget old ones
	// unanswered holds, per type URL, the versions sent and neither
	// acknowledged nor rejected yet, oldest first, with when each was
	// sent; silent says the oldest has waited longer than AckTimeout.
	unanswered map[string][]sentVersion
	silent     bool
	// opened is when the stream began: an Envoy asks for the endpoints
	// as soon as it has the clusters, so a stream that has acknowledged
	// none owes them from here, whether or not it ever asked.
	opened time.Time
}

// sentVersion is a version sent on a stream, and when.
type sentVersion struct {
	version uint64
	at      time.Time
}

// maxUnanswered bounds what a stream that answers nothing makes vgw keep:
// past it, the newest are forgotten, which changes neither when the stream
// began to wait nor the need to answer a newer version.
const maxUnanswered = 16

// sentOne records a version sent.
func (st *adsStream) sentOne(typeURL string, version uint64, at time.Time) {
	st.sent[typeURL] = max(st.sent[typeURL], version)
	if u := st.unanswered[typeURL]; len(u) < maxUnanswered {
		st.unanswered[typeURL] = append(u, sentVersion{version, at})
	}
}

// answeredUpTo records that the Envoy answered (acknowledged or rejected)
// version and every earlier one of typeURL, and whether that ends its
// silence: the oldest it still owes has not waited past timeout.
func (st *adsStream) answeredUpTo(typeURL string, version uint64, now time.Time, timeout time.Duration) {
	u := st.unanswered[typeURL]
	i := 0
	for i < len(u) && u[i].version <= version {
		i++
	}
	st.unanswered[typeURL] = u[i:]
	if since := st.waitingSince(); since.IsZero() || now.Sub(since) <= timeout {
		st.silent = false
	}
}

// waitingSince is when the oldest version the stream has not answered was
// sent, or when it opened if it has acknowledged no endpoints yet; zero
// when it owes nothing.
func (st *adsStream) waitingSince() time.Time {
	var oldest time.Time
	if st.acked[resource.EndpointType] == 0 {
		oldest = st.opened
	}
	for _, u := range st.unanswered {
		if len(u) > 0 && (oldest.IsZero() || u[0].at.Before(oldest)) {
			oldest = u[0].at
		}
	}
	return oldest
}

// standing is where the stream stands with the endpoints (EDS): the
// versions it acknowledged, was sent and rejected, and whether it has
// stopped answering.
func (st *adsStream) standing() standing {
	return standing{acked: st.acked[resource.EndpointType], sent: st.sent[resource.EndpointType],
		nacked: st.nacked[resource.EndpointType], silent: st.silent}
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
	Node             string
	Streams          int
	ClustersVersion  string // the CDS version acknowledged
	EndpointsVersion string // the EDS version acknowledged
	LastNACK         *NACK
	// Silent counts its streams that have left a version unanswered for
	// longer than AckTimeout, since SilentSince (the earliest).
	Silent      int
	SilentSince time.Time
}

// group is the one key every Envoy's snapshot is stored under: all Envoys
// front the same models, so they are served the same snapshot, while their
// acknowledgements are tracked per node.
type group struct{}

func (group) ID(*corev3.Node) string { return "vgw" }

// Options are a Server's settings.
type Options struct {
	// Settings shape the clusters and how long requests wait for Envoys.
	Settings
	// Log is where the server says what Envoys do; slog.Default() when nil.
	Log *slog.Logger
	// OnNACK, when set, is told of every version an Envoy rejects, off
	// the server's lock.
	OnNACK func(NACK)
}

// Counters are the server's totals since it started.
type Counters struct {
	Pushes uint64 // snapshots published
	ACKs   uint64
	NACKs  uint64
}

// Counters returns the server's totals.
func (s *Server) Counters() Counters {
	return Counters{Pushes: s.pushes.Load(), ACKs: s.ackN.Load(), NACKs: s.nackN.Load()}
}

// New returns an xDS server for src.
func New(src Source, o Options) *Server {
	s, log := o.Settings, cmp.Or(o.Log, slog.Default())
	b := make([]byte, 3)
	rand.Read(b)
	srv := &Server{
		src: src, settings: s, log: log,
		boot:    hex.EncodeToString(b),
		again:   make(chan struct{}, 1),
		changed: map[string]uint64{},
		current: map[string][]string{},
		streams: map[int64]*adsStream{},
		alone:   time.Now().Add(s.NoEnvoyGrace),
		onNACK:  o.OnNACK,
	}
	srv.acks.Store(&ackTable{alone: srv.alone, next: make(chan struct{})})
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
	return srv
}

// Register adds the ADS service to g.
func (s *Server) Register(g *grpc.Server) {
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, s.ads)
}

// Republish makes the next snapshot a new version even if nothing
// changed, so that every Envoy is sent the config again: after an Envoy
// rejected a version, once its cause is fixed.
func (s *Server) Republish() {
	s.force.Store(true)
	select {
	case s.again <- struct{}{}:
	default:
	}
}

// Run publishes a snapshot of the source's View, then of every newer View
// as it comes, until ctx ends; and marks streams that stopped answering.
// Views that come while a snapshot is built are folded into the next.
func (s *Server) Run(ctx context.Context) {
	v := s.src.View()
	s.publish(ctx, v)
	var check <-chan time.Time // nil: no AckTimeout, nothing to check
	if s.settings.AckTimeout > 0 {
		t := time.NewTicker(max(min(s.settings.AckTimeout/4, time.Second), time.Millisecond))
		defer t.Stop()
		check = t.C
	}
	for {
		select {
		case <-v.Changed():
			v = s.src.View()
			s.publish(ctx, v)
		case <-s.again:
			v = s.src.View()
			s.publish(ctx, v)
		case now := <-check:
			s.silence(now)
		case <-ctx.Done():
			return
		}
	}
}

// silence marks the streams that have left a version unanswered for
// longer than AckTimeout: from now on requests of unknown Envoys do not
// wait for them, and a request of theirs is answered at once (WaitAcked).
func (s *Server) silence(now time.Time) {
	type gone struct {
		node  string
		since time.Time
	}
	var quiet []gone
	s.mu.Lock()
	for _, st := range s.streams {
		if since := st.waitingSince(); st.node != "" && !st.silent && !since.IsZero() && now.Sub(since) > s.settings.AckTimeout {
			st.silent = true
			quiet = append(quiet, gone{st.node, since})
		}
	}
	if len(quiet) > 0 {
		s.refreshLocked()
	}
	s.mu.Unlock()
	for _, q := range quiet {
		s.log.Warn("an Envoy has not answered vgw's xDS updates; requests stop waiting for it",
			slog.String("node", q.node), slog.Duration("for", now.Sub(q.since)))
	}
}

// publish builds and sets the snapshot of v, unless nothing Envoy sees
// changed since the last: a new version costs every Envoy a round of work.
func (s *Server) publish(ctx context.Context, v *manager.View) {
	models := normalise(modelsOf(v))
	if !s.force.Swap(false) && s.last != nil && slices.EqualFunc(models, s.last, sameModel) {
		return
	}
	s.mu.Lock()
	s.version++
	n := s.version
	s.mu.Unlock()
	version := s.boot + "-" + strconv.FormatUint(n, 10)
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
		seen[m.Name] = true
		if !slices.Equal(eps, s.current[m.Name]) {
			s.current[m.Name] = eps
			s.changed[m.Name] = n
		}
	}
	for name := range s.current {
		if !seen[name] {
			delete(s.current, name)
			delete(s.changed, name)
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
	s.streams[id] = &adsStream{acked: map[string]uint64{}, sent: map[string]uint64{}, nacked: map[string]uint64{},
		unanswered: map[string][]sentVersion{}, nonces: map[string]string{}, opened: time.Now()}
	s.mu.Unlock()
	return nil
}

func (s *Server) streamClosed(id int64, node *corev3.Node) {
	s.mu.Lock()
	delete(s.streams, id)
	if !s.anyNodeLocked() {
		s.alone = time.Now().Add(s.settings.NoEnvoyGrace)
	}
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
		s.sawLocked(st.node)
		s.refreshLocked()
	}
	var nack *NACK
	wasSilent := st.silent
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
		v := s.parse(version)
		st.nacked[req.GetTypeUrl()] = max(st.nacked[req.GetTypeUrl()], v)
		st.answeredUpTo(req.GetTypeUrl(), v, time.Now(), s.settings.AckTimeout)
		s.refreshLocked()
	case req.GetResponseNonce() != "":
		// A request acknowledges what was sent with its nonce only when it
		// names that version. Naming another is no acknowledgement: a
		// later one was never sent (a peer could read it off any response
		// and be taken to know endpoints it was never given), and an
		// earlier one is Envoy still on its last good version after it
		// rejected the one with this nonce; grpc_mux_impl.cc keeps the
		// rejected nonce and sends it again, with no error detail, on its
		// next request, such as the EDS request a change of clusters
		// makes. A nonce too old to be remembered counts for at most what
		// the stream was sent.
		sent, known := st.nonces[req.GetResponseNonce()]
		if known && sent != req.GetVersionInfo() {
			break
		}
		v := s.parse(sent)
		if !known {
			v = min(s.parse(req.GetVersionInfo()), st.sent[req.GetTypeUrl()])
		}
		st.acked[req.GetTypeUrl()] = v
		st.answeredUpTo(req.GetTypeUrl(), v, time.Now(), s.settings.AckTimeout)
		s.ackN.Add(1)
		s.refreshLocked()
	}
	node, back := st.node, wasSilent && !st.silent
	s.mu.Unlock()
	if back {
		s.log.Info("an Envoy answers vgw's xDS versions again", slog.String("node", node))
	}
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
	st.sentOne(resp.GetTypeUrl(), s.parse(resp.GetVersionInfo()), time.Now())
	st.order = append(st.order, resp.GetNonce())
	if len(st.order) > 32 {
		delete(st.nonces, st.order[0])
		st.order = st.order[1:]
	}
	if resp.GetTypeUrl() == resource.EndpointType {
		s.refreshLocked() // a newer version sent is one the Envoy may yet take
	}
}

// refreshLocked publishes a new ackTable from the streams and the
// published endpoints, and so wakes the waiters. s.mu is held.
func (s *Server) refreshLocked() {
	t := &ackTable{models: make(map[string]modelAcks, len(s.current)), nodes: map[string][]standing{}, next: make(chan struct{})}
	for _, st := range s.streams {
		if st.node != "" {
			t.nodes[st.node] = append(t.nodes[st.node], st.standing())
		}
	}
	if len(t.nodes) == 0 {
		t.alone = s.alone
	}
	for model, eps := range s.current {
		need := s.changed[model]
		t.models[model] = modelAcks{endpoints: eps, need: need, all: t.judge("", need) == released}
	}
	close(s.acks.Swap(t).next)
}

// anyNodeLocked reports whether an Envoy that has said its node id is
// connected. s.mu is held.
func (s *Server) anyNodeLocked() bool {
	for _, st := range s.streams {
		if st.node != "" {
			return true
		}
	}
	return false
}

// ackTable is the one record of who acknowledged what, at one moment:
// each model's published endpoints with the version that holds them,
// and where each connected Envoy stands with the endpoints. It is built
// whole under s.mu whenever any of that changes and never changed after,
// so the request path's check (Acked) is one atomic load and a few map
// reads, and a waiter (WaitAcked) judges by the same value it then waits
// on: next is closed when a newer table replaces it.
type ackTable struct {
	models map[string]modelAcks  // by model name, as requests name them
	nodes  map[string][]standing // the streams of each node id
	// alone, while no Envoy is connected, is when requests stop waiting
	// for one.
	alone time.Time
	next  chan struct{}
}

// modelAcks is a model's published endpoints (sorted), the EDS version in
// which they last changed, and whether every counted Envoy knows them.
type modelAcks struct {
	endpoints []string
	need      uint64
	all       bool
}

// standing is one stream's place with the endpoints: see
// adsStream.standing.
type standing struct {
	acked, sent, nacked uint64
	silent              bool
}

// rejected says the stream's Envoy rejected the latest endpoints it was
// sent, and they hold version need: it will route by them only once vgw
// sends a newer version, which it does only when something changes.
func (st standing) rejected(need uint64) bool { return st.nacked >= need && st.nacked >= st.sent }

// stance is where the stream's Envoy stands with EDS version need: it
// knows it (released), is working on it (pending), or cannot be counted
// on to (hopeless: it rejected it, or has stopped answering).
func (st standing) stance(need uint64) verdict {
	switch {
	case st.acked >= need:
		return released
	case st.silent || st.rejected(need):
		return hopeless
	}
	return pending
}

// verdict is what a request waiting for an Envoy's acknowledgement can
// expect.
type verdict uint8

const (
	pending  verdict = iota // not yet: the Envoy is working on it
	released                // it knows the endpoints
	hopeless                // it rejected them, or stopped answering
	absent                  // no such Envoy on xDS
)

// judge says where node's Envoy (every counted one, for "") stands with
// the EDS version need, which holds a cluster's current endpoints. For a
// node, one of its streams that knows is enough: another under the same
// id (the Envoy restarted and its old stream lingers, or an impostor)
// cannot hold the node's requests back. For "", every stream that can
// still know must: one that rejected the version or stopped answering is
// not waited for (it is hopeless only when all are).
func (t *ackTable) judge(node string, need uint64) verdict {
	seen, known, working := false, false, false
	look := func(sts []standing) {
		for _, st := range sts {
			seen = true
			switch st.stance(need) {
			case released:
				known = true
			case pending:
				working = true
			}
		}
	}
	if node != "" {
		look(t.nodes[node])
	} else {
		for _, sts := range t.nodes {
			look(sts)
		}
	}
	switch {
	case !seen:
		return absent
	case node != "" && known:
		return released
	case working:
		return pending
	case known:
		return released
	}
	return hopeless
}

// Acked reports whether addr is among model's published endpoints and
// node's Envoy (every counted Envoy, for "") has acknowledged them. It is
// the request path's check: one atomic load, a map read and a search of a
// short list while every Envoy knows the endpoints; only while one does
// not (a new one, one that rejected the version, one that stopped
// answering) does it judge the request's own Envoy, so that only its
// requests wait. With no Envoy on xDS it waits only within the grace
// after the last one left.
func (s *Server) Acked(node, model, addr string) bool {
	t := s.acks.Load()
	if len(t.nodes) == 0 {
		return !time.Now().Before(t.alone)
	}
	c := t.models[model]
	if !slices.Contains(c.endpoints, addr) {
		return false
	}
	if node == "" {
		return c.all
	}
	if c.all {
		// Every Envoy that can know does; one that cannot (it rejected
		// the version, or stopped answering) is told so by WaitAcked, not
		// let through here.
		if _, known := t.nodes[node]; !known {
			return true
		}
		return t.judge(node, c.need) == released
	}
	v, _ := s.judgeAsker(t, node, c.need)
	return v == released
}

// WaitAcked returns once the address addr gives (where the request's
// lease found the model, while the model is still ready there) has been
// published as one of model's endpoints and node's Envoy (every counted Envoy, for "") has
// acknowledged the version holding it, so that a request released now is
// routed where the model runs. An Envoy learns of new hosts when it applies
// an EDS update, before it acknowledges it (grpc_mux_impl.cc), and posts
// them to its workers right away (cluster_manager_impl.cc); WaitAcked
// allows applyGrace more for that.
//
// When the Envoy has rejected that version, or has stopped answering
// (AckTimeout), it returns a *NotAckedError at once: vgw does not send a
// rejected version again until something changes, so waiting would only
// end at the request's deadline. When no Envoy in question is connected,
// it waits until NoEnvoyGrace has passed since vgw started or the last
// Envoy left, then returns nil: with no Envoy on xDS (one with a static
// config, say) there is nothing to wait for, and the request is better sent
// than held. addr returning "" means the model is no longer ready: ErrGone.
func (s *Server) WaitAcked(ctx context.Context, node, model string, addr func() string) error {
	for {
		a := addr()
		if a == "" {
			return ErrGone
		}
		t := s.acks.Load()
		c := t.models[model]
		published := slices.Contains(c.endpoints, a)
		v, judged := s.judgeAsker(t, node, c.need)
		if published {
			switch v {
			case released:
				return sleep(ctx, applyGrace)
			case hopeless:
				return s.notAcked(judged, model, c.need)
			}
		}
		var giveUp *time.Timer
		var expired <-chan time.Time
		if published && v == absent {
			until := time.Until(t.alone)
			if until <= 0 {
				return nil
			}
			giveUp = time.NewTimer(until)
			expired = giveUp.C
		}
		select {
		case <-t.next:
		case <-expired: // looked at again: the Envoy may have connected meanwhile
		case <-ctx.Done():
		}
		if giveUp != nil {
			giveUp.Stop()
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}

// judgeAsker is t.judge for the Envoy a request names, and the node it
// was judged as. A name no xDS stream has while other Envoys are
// connected is a misconfigured Envoy (its x-vgw-node is not its node id)
// or one whose stream is reconnecting: its requests are judged as an
// unknown Envoy's (""), which wait for every Envoy, rather than let
// through unchecked, and the operator is told, once, of a name never
// seen on xDS.
func (s *Server) judgeAsker(t *ackTable, node string, need uint64) (verdict, string) {
	v := t.judge(node, need)
	if v == absent && node != "" && len(t.nodes) > 0 {
		s.mu.Lock()
		warn := s.strangeLocked(node)
		s.mu.Unlock()
		if warn {
			s.warnStranger(node)
		}
		return t.judge("", need), ""
	}
	return v, node
}

func (s *Server) warnStranger(node string) {
	s.log.Warn("ext_proc requests name an Envoy no xDS stream has: its x-vgw-node metadata must equal its node.id (or be %HOSTNAME% with --service-node set to the hostname); until then its requests wait for every Envoy",
		slog.String("x_vgw_node", node))
}

// sawLocked records a node that connected to xDS. s.mu is held.
func (s *Server) sawLocked(node string) {
	if s.seenNodes == nil {
		s.seenNodes = map[string]bool{}
	}
	if len(s.seenNodes) < 1024 {
		s.seenNodes[node] = true
	}
}

// strangeLocked records node as seen on ext_proc but never on xDS (not
// one whose stream is only reconnecting), and reports whether it is the
// first time, so it is warned about once; a few hundred at most are
// remembered. s.mu is held.
func (s *Server) strangeLocked(node string) bool {
	if s.seenNodes[node] || s.strangers[node] || len(s.strangers) >= 256 {
		return false
	}
	if s.strangers == nil {
		s.strangers = map[string]bool{}
	}
	s.strangers[node] = true
	return true
}

// NotAckedError says a request's Envoy cannot route to its model's server
// by the version vgw published: it rejected the version, or has stopped
// answering vgw's updates.
type NotAckedError struct {
	Node     string // "" when the request's Envoy is unknown
	Cluster  string
	Rejected string // the Envoy's error, when it rejected the version
}

func (e *NotAckedError) Error() string {
	who := "Envoy " + e.Node
	if e.Node == "" {
		who = "an Envoy"
	}
	if e.Rejected != "" {
		return fmt.Sprintf("%s rejected the xDS version holding %s's endpoint: %s", who, e.Cluster, e.Rejected)
	}
	return fmt.Sprintf("%s has not answered vgw's xDS updates for over the ack timeout, so it may not route to %s", who, e.Cluster)
}

// Public is what a client is told: the proxy's config is not in step.
func (e *NotAckedError) Public() string {
	return "the proxy has not taken up where the model runs"
}

// RetryAfter suggests when to try again: an operator has to act, or the
// Envoy to come back.
func (e *NotAckedError) RetryAfter() time.Duration { return 30 * time.Second }

func (s *Server) notAcked(node, model string, need uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := &NotAckedError{Node: node, Cluster: ClusterName(model)}
	for i := len(s.nacks) - 1; i >= 0; i-- {
		n := s.nacks[i]
		if (n.Node == node || node == "") && n.TypeURL == resource.EndpointType && s.parse(n.Version) >= need {
			e.Rejected = n.Error
			break
		}
	}
	return e
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
		if st.silent {
			ns.Silent++
			if since := st.waitingSince(); ns.SilentSince.IsZero() || since.Before(ns.SilentSince) {
				ns.SilentSince = since
			}
		}
		// With several streams from one node, report the furthest.
		if v := s.versionString(st.acked[resource.ClusterType]); s.parse(v) > s.parse(ns.ClustersVersion) {
			ns.ClustersVersion = v
		}
		if v := s.versionString(st.acked[resource.EndpointType]); s.parse(v) > s.parse(ns.EndpointsVersion) {
			ns.EndpointsVersion = v
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
