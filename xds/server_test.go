package xds_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/xds"
	"github.com/vgw-project/vgw/xds/xdstest"
)

// models is a Source a test changes: set and the map change what the
// next View shows, publish publishes it, as the manager publishes a View
// when something changed.
type models struct {
	mu    sync.Mutex
	ms    map[string]*xds.Model
	views *manager.Views
}

func newModels(names ...string) *models {
	m := &models{ms: map[string]*xds.Model{}, views: manager.NewViews()}
	for _, n := range names {
		m.ms[n] = &xds.Model{Name: n, Cluster: xds.ClusterName(n), MaxConcurrent: 4}
	}
	m.publish()
	return m
}

// Models is what the next View holds, as Build takes it.
func (m *models) Models() []xds.Model {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []xds.Model
	for _, x := range m.ms {
		out = append(out, xds.Model{Name: x.Name, Cluster: x.Cluster, MaxConcurrent: x.MaxConcurrent, Endpoints: slices.Clone(x.Endpoints)})
	}
	return out
}

func (m *models) set(name string, eps ...string) {
	m.mu.Lock()
	m.ms[name].Endpoints = eps
	m.mu.Unlock()
}

// publish publishes a View of the models: one with an endpoint is ready
// there.
func (m *models) publish() {
	m.mu.Lock()
	var mvs []manager.ModelView
	for name, x := range m.ms {
		mv := manager.ModelView{Name: name, Limits: config.Limits{MaxConcurrent: x.MaxConcurrent}}
		if len(x.Endpoints) > 0 {
			mv.State, mv.Endpoint = manager.Ready, x.Endpoints[0]
		}
		mvs = append(mvs, mv)
	}
	m.mu.Unlock()
	m.views.Publish(mvs, nil)
}

func (m *models) View() *manager.View { return m.views.View() }

type fixture struct {
	srv      *xds.Server
	src      *models
	settings xds.Settings
	conn     *grpc.ClientConn
	addr     string
}

func start(t testing.TB, src *models) *fixture {
	t.Helper()
	return startWith(t, src, xds.DefaultSettings)
}

func startWith(t testing.TB, src *models, s xds.Settings) *fixture {
	t.Helper()
	f := &fixture{src: src, settings: s}
	f.serve(t)
	return f
}

// at is an address that does not move.
func at(addr string) func() string { return func() string { return addr } }

// serve runs a (new) xDS server for f.src, as a vgw (re)start does.
func (f *fixture) serve(t testing.TB) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.src.publish() // what the models are as it starts
	f.srv = xds.New(f.src, xds.Options{Settings: f.settings, Log: slog.New(slog.DiscardHandler)})
	g := grpc.NewServer()
	f.srv.Register(g)
	healthpb.RegisterHealthServer(g, health.NewServer())
	ctx, cancel := context.WithCancel(context.Background())
	go f.srv.Run(ctx)
	go g.Serve(lis)
	t.Cleanup(func() { g.Stop(); cancel() })
	f.addr = lis.Addr().String()
	f.conn, err = grpc.NewClient(f.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.conn.Close() })
}

func (f *fixture) envoy(t testing.TB, node string) *xdstest.Client {
	t.Helper()
	c, err := xdstest.Dial(context.Background(), f.conn, node)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func wait(t testing.TB, c *xdstest.Client, what string, cond func(*xdstest.Client) bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := c.Wait(ctx, cond); err != nil {
		t.Fatalf("waiting until %s: %v", what, err)
	}
}

func routes(cluster string, eps ...string) func(*xdstest.Client) bool {
	return func(c *xdstest.Client) bool { return slices.Equal(c.Endpoints(cluster), eps) }
}

// TestEndpointsFollowTheModels: a model's endpoint appears when it loads,
// moves when it is swapped, and goes when it is unloaded.
func TestEndpointsFollowTheModels(t *testing.T) {
	f := start(t, newModels("llama", "qwen"))
	c := f.envoy(t, "envoy-1")
	wait(t, c, "the clusters arrive, without endpoints", func(c *xdstest.Client) bool {
		return c.Cluster("model/llama") != nil && c.Cluster("model/qwen") != nil && len(c.Endpoints("model/llama")) == 0
	})
	cl := c.Cluster("model/llama")
	if got := cl.GetCircuitBreakers().GetThresholds()[0].GetMaxRequests().GetValue(); got != 4 {
		t.Errorf("circuit breaker max_requests %d, want max_concurrent 4", got)
	}
	if cl.GetConnectTimeout().AsDuration() != 5*time.Second || cl.GetEdsClusterConfig().GetEdsConfig().GetAds() == nil {
		t.Errorf("cluster %v", cl)
	}

	f.src.set("llama", "10.0.0.5:8000")
	f.src.publish()
	wait(t, c, "llama's endpoint appears", routes("model/llama", "10.0.0.5:8000"))
	poll.Until(t, "the server knows the Envoy acknowledged it", func() bool { return f.srv.Acked("", "llama", "10.0.0.5:8000") })
	if f.srv.Acked("", "llama", "10.0.0.9:8000") {
		t.Fatal("an address never published counts as known")
	}

	f.src.set("llama")
	f.src.set("qwen", "10.0.0.5:8000")
	f.src.publish()
	wait(t, c, "the swap", func(c *xdstest.Client) bool {
		return len(c.Endpoints("model/llama")) == 0 && slices.Equal(c.Endpoints("model/qwen"), []string{"10.0.0.5:8000"})
	})

	f.src.set("qwen")
	f.src.publish()
	wait(t, c, "qwen's endpoint goes", routes("model/qwen"))
	poll.Until(t, "the status shows envoy-1 at the last version", func() bool {
		nodes, _ := f.srv.Status()
		return len(nodes) == 1 && nodes[0].Node == "envoy-1" && nodes[0].EndpointsVersion == f.srv.Version()
	})
}

// TestNACK: a rejected version is recorded with its error, and not sent
// again until something changes.
func TestNACK(t *testing.T) {
	f := start(t, newModels("llama"))
	c := f.envoy(t, "envoy-1")
	wait(t, c, "the first config", func(c *xdstest.Client) bool { return c.Acked(resource.EndpointType) != "" })
	good := c.Acked(resource.EndpointType)
	c.Reject(resource.EndpointType, "endpoint port out of range")
	f.src.set("llama", "10.0.0.5:8000")
	f.src.publish()
	deadline := time.Now().Add(time.Minute)
	for {
		_, nacks := f.srv.Status()
		if len(nacks) > 0 {
			n := nacks[0]
			if n.Node != "envoy-1" || n.Error != "endpoint port out of range" || n.Version != f.srv.Version() || n.TypeURL != resource.EndpointType {
				t.Fatalf("NACK %+v", n)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no NACK recorded")
		}
		time.Sleep(time.Millisecond) // polling interval
	}
	time.Sleep(200 * time.Millisecond) // a resend loop would show by now
	if _, nacks := f.srv.Status(); len(nacks) != 1 {
		t.Fatalf("%d NACKs: the rejected version was sent again", len(nacks))
	}
	if got := c.Acked(resource.EndpointType); got != good {
		t.Fatalf("the client runs %s, want still %s", got, good)
	}
	if f.srv.Acked("", "llama", "10.0.0.5:8000") {
		t.Fatal("a rejected endpoint counts as known")
	}
	nodes, _ := f.srv.Status()
	if nodes[0].LastNACK == nil {
		t.Fatal("the node's status has no NACK")
	}
	// The next change is sent, and accepted.
	f.src.set("llama", "10.0.0.6:8000")
	f.src.publish()
	wait(t, c, "the next version", routes("model/llama", "10.0.0.6:8000"))
}

// TestTwoNodes: both Envoys get the config; a cluster is known when both
// acknowledged it, and waiting for one node waits for that one only.
func TestTwoNodes(t *testing.T) {
	f := start(t, newModels("llama"))
	a := f.envoy(t, "envoy-a")
	b := f.envoy(t, "envoy-b")
	for _, c := range []*xdstest.Client{a, b} {
		wait(t, c, "configured", func(c *xdstest.Client) bool { return c.Acked(resource.EndpointType) != "" })
	}
	b.Hold(resource.EndpointType) // slow to take the next version up
	f.src.set("llama", "10.0.0.5:8000")
	f.src.publish()
	wait(t, a, "a routes llama", routes("model/llama", "10.0.0.5:8000"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := f.srv.WaitAcked(ctx, "envoy-a", "llama", at("10.0.0.5:8000")); err != nil {
		t.Fatalf("waiting for a: %v", err)
	}
	if f.srv.Acked("", "llama", "10.0.0.5:8000") {
		t.Fatal("known to every Envoy while b has not taken it up")
	}
	short, c2 := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer c2()
	if err := f.srv.WaitAcked(short, "envoy-b", "llama", at("10.0.0.5:8000")); err == nil {
		t.Fatal("b's request released before b took the version up")
	}
	b.Release(resource.EndpointType)
	if err := f.srv.WaitAcked(ctx, "envoy-b", "llama", at("10.0.0.5:8000")); err != nil {
		t.Fatalf("waiting for b once it took the version up: %v", err)
	}
	poll.Until(t, "known to every Envoy", func() bool { return f.srv.Acked("", "llama", "10.0.0.5:8000") })
}

// TestReconnect: an Envoy that reconnects gets the current state at once;
// after a vgw restart every Envoy is resynced, and a version from the old
// process does not count as knowing the new one's endpoints.
func TestReconnect(t *testing.T) {
	src := newModels("llama")
	src.set("llama", "10.0.0.5:8000")
	f := start(t, src)
	c := f.envoy(t, "envoy-1")
	wait(t, c, "configured", routes("model/llama", "10.0.0.5:8000"))
	c.Close()
	c = f.envoy(t, "envoy-1")
	wait(t, c, "configured again on reconnect", routes("model/llama", "10.0.0.5:8000"))

	src.set("llama", "10.0.0.9:8000")
	f.serve(t) // a new vgw process
	c = f.envoy(t, "envoy-1")
	wait(t, c, "resynced by the new vgw", routes("model/llama", "10.0.0.9:8000"))
	poll.Until(t, "the new vgw sees its version acknowledged", func() bool { return f.srv.Acked("", "llama", "10.0.0.9:8000") })
}

// TestHeldRequestReleasedAfterACK: a request waiting for its model's
// endpoint is released only once the Envoy carrying it has acknowledged
// the version holding that endpoint. If the Envoy rejects that version,
// the request is answered at once: vgw sends no rejected version again
// until something changes, so it would wait only for its deadline.
func TestHeldRequestReleasedAfterACK(t *testing.T) {
	f := start(t, newModels("llama"))
	c := f.envoy(t, "envoy-1")
	wait(t, c, "configured", func(c *xdstest.Client) bool { return c.Acked(resource.EndpointType) != "" })
	c.Reject(resource.EndpointType, "not yet")
	f.src.set("llama", "10.0.0.5:8001") // the model loaded here
	answered := make(chan error, 1)
	go func() {
		answered <- f.srv.WaitAcked(context.Background(), "envoy-1", "llama", at("10.0.0.5:8001"))
	}()
	select {
	case err := <-answered:
		t.Fatalf("answered before the endpoint was published: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	f.src.publish() // published; the Envoy rejects it
	var na *xds.NotAckedError
	if err := <-answered; !errors.As(err, &na) || na.Rejected != "not yet" || na.Node != "envoy-1" {
		t.Fatalf("a request whose Envoy rejected its endpoint: %v, want a NotAckedError quoting the rejection", err)
	}
	f.srv.Republish() // published again as a new version, which is accepted
	wait(t, c, "the new version is acknowledged", func(c *xdstest.Client) bool { return c.Acked(resource.EndpointType) == f.srv.Version() })
	if err := f.srv.WaitAcked(context.Background(), "envoy-1", "llama", at("10.0.0.5:8001")); err != nil {
		t.Fatal(err)
	}
	if got := firstOr(c.Endpoints("model/llama"), "nothing"); got != "10.0.0.5:8001" {
		t.Fatalf("released while the Envoy routes to %s", got)
	}
}

// silentStream opens an ADS stream as node that never answers, for the
// rest of the test.
func (f *fixture) silentStream(t *testing.T, node string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := xdstest.Silent(ctx, f.conn, node); err != nil {
		t.Fatal(err)
	}
}

// TestSilentStreams: one ADS stream that never answers (under the Envoys'
// own node id, or another) holds back no request of an Envoy that has
// acknowledged; it stops counting for requests of unknown Envoys once
// AckTimeout passes, and shows in status; a request of its own node when
// it is the node's only stream is answered at once after that. It made
// every request of the ready model wait for it until the request's
// deadline, and fell every Envoy off the fast path.
func TestSilentStreams(t *testing.T) {
	f := startServing(t, 300*time.Millisecond)
	poll.Until(t, "every Envoy knows llama", func() bool { return f.srv.Acked("", "llama", "10.0.0.5:8000") })

	f.silentStream(t, "envoy-1") // an impostor under the Envoy's own id
	f.silentStream(t, "stuck")   // a stuck Envoy of its own
	poll.Until(t, "both are connected", func() bool {
		n, _ := f.srv.Status()
		return len(n) == 2 && n[0].Streams == 2
	})
	if !f.srv.Acked("envoy-1", "llama", "10.0.0.5:8000") {
		t.Error("envoy-1's requests are held by a stream that acknowledged nothing")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := f.srv.WaitAcked(ctx, "envoy-1", "llama", at("10.0.0.5:8000")); err != nil {
		t.Fatalf("envoy-1's request: %v", err)
	}

	// Past AckTimeout the silent streams stop counting: requests of an
	// unknown Envoy are let through, and the fast path is back.
	poll.Until(t, "the fast path is back", func() bool { return f.srv.Acked("", "llama", "10.0.0.5:8000") })
	if err := f.srv.WaitAcked(ctx, "", "llama", at("10.0.0.5:8000")); err != nil {
		t.Fatalf("a request of an unknown Envoy: %v", err)
	}
	nodes, _ := f.srv.Status()
	for _, n := range nodes {
		if n.Silent != 1 || n.SilentSince.IsZero() {
			t.Errorf("status of %s: %d silent streams since %v, want 1", n.Node, n.Silent, n.SilentSince)
		}
	}
	// The stuck Envoy's own request cannot be released: it is told so
	// at once, not at its deadline.
	var na *xds.NotAckedError
	if err := f.srv.WaitAcked(ctx, "stuck", "llama", at("10.0.0.5:8000")); !errors.As(err, &na) || na.Rejected != "" {
		t.Fatalf("a request of the stuck Envoy: %v, want a NotAckedError", err)
	}
}

// TestNoEnvoy: with no Envoy on xDS there is nothing to wait for beyond a
// short grace.
func TestNoEnvoy(t *testing.T) {
	s := xds.DefaultSettings
	s.NoEnvoyGrace = 500 * time.Millisecond // long enough that no check below can be late for it
	f := startWith(t, newModels("llama"), s)
	f.src.set("llama", "10.0.0.5:8000")
	f.src.publish()
	poll.Until(t, "published", func() bool { return f.srv.Version() != "" })
	time.Sleep(510 * time.Millisecond) // the grace since start passes
	if !f.srv.Acked("", "llama", "10.0.0.5:8000") {
		t.Fatal("with no Envoy on xDS past the grace, the fast path still holds requests")
	}
	c := f.envoy(t, "envoy-1")
	wait(t, c, "configured", routes("model/llama", "10.0.0.5:8000"))
	// The server has the Envoy's ACK, then sees it leave.
	poll.Until(t, "the ACK is in", func() bool { return f.srv.Acked("", "llama", "10.0.0.5:8000") })
	start := time.Now() // the grace runs from when the server sees it leave, after this
	c.Close()
	poll.Until(t, "the Envoy has left", func() bool { n, _ := f.srv.Status(); return len(n) == 0 })
	if f.srv.Acked("", "llama", "10.0.0.5:8000") {
		t.Fatal("right after the last Envoy left, requests are not held for the grace")
	}
	if err := f.srv.WaitAcked(context.Background(), "", "llama", at("10.0.0.5:8000")); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 500*time.Millisecond {
		t.Fatalf("waited %v, want the 500ms grace", d)
	}
}

func firstOr(xs []string, def string) string {
	if len(xs) == 0 {
		return def
	}
	return xs[0]
}

// TestGraceDoesNotReleasePastAConnectedEnvoy: once an Envoy is connected,
// the no-Envoy grace no longer releases a request it has not acknowledged.
func TestGraceDoesNotReleasePastAConnectedEnvoy(t *testing.T) {
	s := xds.DefaultSettings
	s.NoEnvoyGrace = 100 * time.Millisecond
	f := startWith(t, newModels("llama"), s)
	c := f.envoy(t, "envoy-1")
	wait(t, c, "configured", func(c *xdstest.Client) bool { return c.Acked(resource.EndpointType) != "" })
	c.Hold(resource.EndpointType) // working on it, so far as vgw can tell
	f.src.set("llama", "10.0.0.5:8000")
	f.src.publish()
	ctx, cancel := context.WithTimeout(context.Background(), 400*time.Millisecond)
	defer cancel()
	if err := f.srv.WaitAcked(ctx, "envoy-1", "llama", at("10.0.0.5:8000")); err == nil {
		t.Fatal("released by the grace although the Envoy is connected and has not acknowledged")
	}
}

// TestNewEnvoyKnowsNothing: when a second Envoy connects, a cluster is no
// longer known to every Envoy until it too has acknowledged it.
func TestNewEnvoyKnowsNothing(t *testing.T) {
	f := start(t, newModels("llama"))
	f.src.set("llama", "10.0.0.5:8000")
	f.src.publish()
	a := f.envoy(t, "envoy-a")
	wait(t, a, "a routes llama", routes("model/llama", "10.0.0.5:8000"))
	poll.Until(t, "known", func() bool { return f.srv.Acked("", "llama", "10.0.0.5:8000") })
	b, err := xdstest.Dial(context.Background(), f.conn, "envoy-b", xdstest.Holding(resource.EndpointType))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	poll.Until(t, "b's arrival is noticed", func() bool { n, _ := f.srv.Status(); return len(n) == 2 })
	if f.srv.Acked("", "llama", "10.0.0.5:8000") {
		t.Fatal("known to every Envoy before b acknowledged anything")
	}
}

// TestWaitFollowsAMovingModel: a model that restarts elsewhere while a
// request waits is waited for at its new address; one that stops ends the
// wait.
func TestWaitFollowsAMovingModel(t *testing.T) {
	f := start(t, newModels("llama"))
	c := f.envoy(t, "envoy-1")
	wait(t, c, "configured", func(c *xdstest.Client) bool { return c.Acked(resource.EndpointType) != "" })
	var mu sync.Mutex
	addr := "10.0.0.5:8000"
	current := func() string { mu.Lock(); defer mu.Unlock(); return addr }
	done := make(chan error, 1)
	go func() { done <- f.srv.WaitAcked(context.Background(), "envoy-1", "llama", current) }()
	mu.Lock()
	addr = "10.0.0.6:8000" // it moved before the first address was ever published
	mu.Unlock()
	f.src.set("llama", "10.0.0.6:8000")
	f.src.publish()
	if err := <-done; err != nil {
		t.Fatalf("waiting at the new address: %v", err)
	}
	mu.Lock()
	addr = ""
	mu.Unlock()
	if err := f.srv.WaitAcked(context.Background(), "envoy-1", "llama", current); !errors.Is(err, xds.ErrGone) {
		t.Fatalf("a stopped model: %v", err)
	}
}

// TestStrangerWaitsForEveryEnvoy: a request naming an Envoy that has no
// xDS stream (its x-vgw-node is not its node id) while other Envoys are
// connected is judged as an unknown Envoy's: it waits for every Envoy,
// rather than being let through unchecked.
func TestStrangerWaitsForEveryEnvoy(t *testing.T) {
	f := start(t, newModels("llama"))
	c := f.envoy(t, "envoy-1")
	wait(t, c, "configured", func(c *xdstest.Client) bool { return c.Acked(resource.EndpointType) != "" })
	c.Hold(resource.EndpointType)
	f.src.set("llama", "10.0.0.5:8000")
	f.src.publish()
	poll.Until(t, "published", func() bool { return f.srv.Version() != c.Acked(resource.EndpointType) })
	if f.srv.Acked("misnamed", "llama", "10.0.0.5:8000") {
		t.Fatal("a request of a misnamed Envoy is let through while envoy-1 has not taken up the endpoint")
	}
	answered := make(chan error, 1)
	go func() {
		answered <- f.srv.WaitAcked(context.Background(), "misnamed", "llama", at("10.0.0.5:8000"))
	}()
	select {
	case err := <-answered:
		t.Fatalf("answered before every Envoy knew the endpoint: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	c.Release(resource.EndpointType)
	if err := <-answered; err != nil {
		t.Fatal(err)
	}
}

// TestRejectingEnvoyHoldsNoOneElse: an Envoy that rejects the version
// holding a model's endpoint gets its own requests answered at once (by
// the fast check and WaitAcked alike), but
// neither takes the fast path away from the Envoys that took the version
// up nor fails the requests of an Envoy that does not say who it is (it
// did both: every request of an unknown Envoy got 503).
func TestRejectingEnvoyHoldsNoOneElse(t *testing.T) {
	f := start(t, newModels("llama"))
	good := f.envoy(t, "envoy-1")
	bad := f.envoy(t, "misconfigured")
	for _, c := range []*xdstest.Client{good, bad} {
		wait(t, c, "configured", func(c *xdstest.Client) bool { return c.Acked(resource.EndpointType) != "" })
	}
	bad.Reject(resource.EndpointType, "bad")
	f.src.set("llama", "10.0.0.5:8000")
	f.src.publish()
	wait(t, good, "envoy-1 routes llama", routes("model/llama", "10.0.0.5:8000"))
	poll.Until(t, "the rejection is in", func() bool { _, n := f.srv.Status(); return len(n) == 1 })
	poll.Until(t, "the fast path holds for the Envoys that know", func() bool { return f.srv.Acked("", "llama", "10.0.0.5:8000") })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := f.srv.WaitAcked(ctx, "", "llama", at("10.0.0.5:8000")); err != nil {
		t.Errorf("a request of an unknown Envoy: %v", err)
	}
	var na *xds.NotAckedError
	if err := f.srv.WaitAcked(ctx, "misconfigured", "llama", at("10.0.0.5:8000")); !errors.As(err, &na) || na.Rejected != "bad" {
		t.Errorf("a request of the rejecting Envoy: %v, want a NotAckedError quoting the rejection", err)
	}
	// The fast check agrees: the rejecting Envoy's requests are not let
	// through to endpoints it never took.
	if f.srv.Acked("misconfigured", "llama", "10.0.0.5:8000") {
		t.Error("Acked(misconfigured) = true, yet WaitAcked told it NotAcked")
	}
}

// startServing runs a server with ackTimeout whose model llama serves at
// 10.0.0.5:8000, and an Envoy envoy-1 that routes it there.
func startServing(t *testing.T, ackTimeout time.Duration) *fixture {
	t.Helper()
	s := xds.DefaultSettings
	s.AckTimeout = ackTimeout
	src := newModels("llama")
	src.set("llama", "10.0.0.5:8000")
	f := startWith(t, src, s)
	wait(t, f.envoy(t, "envoy-1"), "configured", routes("model/llama", "10.0.0.5:8000"))
	return f
}

// openADS opens an ADS stream the test drives by hand; it ends with the
// test.
func (f *fixture) openADS(t *testing.T) discoverygrpc.AggregatedDiscoveryService_StreamAggregatedResourcesClient {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stream, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(f.conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return stream
}

// rawStream opens an ADS stream as node, asks for typeURL only, and
// acknowledges every response of it.
func (f *fixture) rawStream(t *testing.T, node, typeURL string) {
	t.Helper()
	stream := f.openADS(t)
	if err := stream.Send(&discoverygrpc.DiscoveryRequest{Node: &corev3.Node{Id: node}, TypeUrl: typeURL}); err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				return
			}
			if stream.Send(&discoverygrpc.DiscoveryRequest{Node: &corev3.Node{Id: node}, TypeUrl: typeURL, VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}) != nil {
				return
			}
		}
	}()
}

// TestStreamThatNeverTakesEndpoints: a stream that answers what it is
// sent but never asks for the endpoints (clusters only) stops counting
// once xds_ack_timeout has passed since it opened: it held every request
// of an unknown Envoy to its deadline, and never showed as silent.
func TestStreamThatNeverTakesEndpoints(t *testing.T) {
	f := startServing(t, 300*time.Millisecond)
	f.rawStream(t, "clusters-only", resource.ClusterType)
	poll.Until(t, "the clusters-only stream is silent", func() bool {
		n, _ := f.srv.Status()
		return len(n) == 2 && n[0].Node == "clusters-only" && n[0].Silent == 1
	})
	poll.Until(t, "the fast path is back", func() bool { return f.srv.Acked("", "llama", "10.0.0.5:8000") })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := f.srv.WaitAcked(ctx, "", "llama", at("10.0.0.5:8000")); err != nil {
		t.Fatalf("a request of an unknown Envoy: %v", err)
	}
}

// TestForgedACK: an acknowledgement counts for the version sent with the
// nonce it answers, not the version it names. A peer under an Envoy's id
// that acknowledged endpoints it was never sent, naming a later version
// (read off any response), released that Envoy's requests before it had
// the endpoint.
func TestForgedACK(t *testing.T) {
	f := start(t, newModels("llama"))
	real := f.envoy(t, "envoy-1")
	wait(t, real, "configured", func(c *xdstest.Client) bool { return c.Acked(resource.EndpointType) != "" })
	boot, _, _ := strings.Cut(f.srv.Version(), "-")
	stream := f.openADS(t)
	node := &corev3.Node{Id: "envoy-1"}
	for _, r := range []*discoverygrpc.DiscoveryRequest{
		{Node: node, TypeUrl: resource.ClusterType},
		{Node: node, TypeUrl: resource.EndpointType, VersionInfo: boot + "-999999", ResponseNonce: "forged"},
	} {
		if err := stream.Send(r); err != nil {
			t.Fatal(err)
		}
	}
	poll.Until(t, "the impostor is connected", func() bool { n, _ := f.srv.Status(); return len(n) == 1 && n[0].Streams == 2 })
	real.Hold(resource.EndpointType)
	f.src.set("llama", "10.0.0.9:8000")
	f.src.publish()
	poll.Until(t, "published", func() bool { return f.srv.Version() != real.Acked(resource.EndpointType) })
	short, c2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer c2()
	if err := f.srv.WaitAcked(short, "envoy-1", "llama", at("10.0.0.9:8000")); err == nil {
		t.Fatalf("released while envoy-1 routes to %v", real.Endpoints("model/llama"))
	}
}

// TestRequestAfterRejectionIsNoACK: after rejecting an EDS version, Envoy
// keeps its old version but remembers the rejected response's nonce, and
// its next EDS request (sent when its subscription changes) carries both,
// without an error detail (grpc_mux_impl.cc: the error detail is cleared
// once sent). That request names the old version: it acknowledges nothing
// new, and a request waiting for the rejected endpoint must not be
// released by it.
func TestRequestAfterRejectionIsNoACK(t *testing.T) {
	f := start(t, newModels("llama"))
	stream := f.openADS(t)
	node := &corev3.Node{Id: "envoy-1"}
	send := func(r *discoverygrpc.DiscoveryRequest) {
		t.Helper()
		r.Node = node
		if err := stream.Send(r); err != nil {
			t.Fatal(err)
		}
	}
	// next reads responses until one of typeURL comes.
	next := func(typeURL string) *discoverygrpc.DiscoveryResponse {
		t.Helper()
		for {
			resp, err := stream.Recv()
			if err != nil {
				t.Fatal(err)
			}
			if resp.GetTypeUrl() == typeURL {
				return resp
			}
		}
	}
	names := []string{"model/llama"}
	send(&discoverygrpc.DiscoveryRequest{TypeUrl: resource.ClusterType})
	cds := next(resource.ClusterType)
	send(&discoverygrpc.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: names})
	send(&discoverygrpc.DiscoveryRequest{TypeUrl: resource.ClusterType, VersionInfo: cds.GetVersionInfo(), ResponseNonce: cds.GetNonce()})
	eds := next(resource.EndpointType)
	send(&discoverygrpc.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: names, VersionInfo: eds.GetVersionInfo(), ResponseNonce: eds.GetNonce()})
	poll.Until(t, "the first version acknowledged", func() bool {
		n, _ := f.srv.Status()
		return len(n) == 1 && n[0].EndpointsVersion == eds.GetVersionInfo()
	})

	f.src.set("llama", "10.0.0.9:8000")
	f.src.publish()
	cds2 := next(resource.ClusterType) // vgw sends the clusters first
	rejected := next(resource.EndpointType)
	send(&discoverygrpc.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: names, VersionInfo: eds.GetVersionInfo(),
		ResponseNonce: rejected.GetNonce(), ErrorDetail: &status.Status{Code: 3, Message: "no"}})
	send(&discoverygrpc.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: names, VersionInfo: eds.GetVersionInfo(),
		ResponseNonce: rejected.GetNonce()})
	// vgw reads a stream's requests in order: once it has the clusters'
	// acknowledgement sent after them, it has judged both.
	send(&discoverygrpc.DiscoveryRequest{TypeUrl: resource.ClusterType, VersionInfo: cds2.GetVersionInfo(), ResponseNonce: cds2.GetNonce()})
	poll.Until(t, "the clusters acknowledged", func() bool {
		n, _ := f.srv.Status()
		return len(n) == 1 && n[0].ClustersVersion == cds2.GetVersionInfo()
	})
	if n, _ := f.srv.Status(); n[0].EndpointsVersion != eds.GetVersionInfo() {
		t.Fatalf("endpoints acknowledged at %s, want still %s", n[0].EndpointsVersion, eds.GetVersionInfo())
	}

	short, c2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer c2()
	if err := f.srv.WaitAcked(short, "envoy-1", "llama", at("10.0.0.9:8000")); err == nil {
		t.Fatal("released: the request naming the old version was taken for an acknowledgement of the rejected one")
	}
}
