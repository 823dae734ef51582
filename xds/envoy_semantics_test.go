package xds_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/jonboulle/clockwork"

	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/xds"
	"github.com/vgw-project/vgw/xds/xdstest"
)

// These tests put vgw's server in front of the harness's Envoy 1.39
// semantics: endpoints kept when an assignment is left out, clusters that
// warm, the CDS ACK held until they are warm, active health checks, and a
// reconnect that keeps the config.

// change edits the models under their lock.
func (m *models) change(f func(ms map[string]*xds.Model)) {
	m.mu.Lock()
	f(m.ms)
	m.mu.Unlock()
}

// dialWith starts an Envoy as node with the harness's options.
func (f *fixture) dialWith(t *testing.T, node string, opts ...xdstest.Option) *xdstest.Client {
	t.Helper()
	c, err := xdstest.Dial(context.Background(), f.conn, node, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// newVersion waits for a version after old to be published, and returns it.
func (f *fixture) newVersion(t *testing.T, old string) string {
	t.Helper()
	poll.Until(t, "a new version is published", func() bool { return f.srv.Version() != old })
	return f.srv.Version()
}

func maxRequests(c *xdstest.Client, cluster string) uint32 {
	return c.Cluster(cluster).GetCircuitBreakers().GetThresholds()[0].GetMaxRequests().GetValue()
}

// TestUnloadedModelIsNoLongerRouted: when a model unloads, vgw sends its
// cluster an empty assignment, so the Envoy stops routing to the dead
// server. An Envoy keeps the endpoints of a cluster whose assignment a
// response leaves out (grpc_mux_impl.cc processDiscoveryResources updates
// only the watches the response has resources for): had vgw left llama's
// assignment out of the version it published for the unload, the Envoy
// would go on sending llama's requests to 10.0.0.5:8000 and this test would
// time out waiting.
func TestUnloadedModelIsNoLongerRouted(t *testing.T) {
	src := newModels("llama", "qwen")
	src.set("llama", "10.0.0.5:8000")
	src.set("qwen", "10.0.0.6:8000")
	f := start(t, src)
	c := f.envoy(t, "envoy-1")
	wait(t, c, "llama is routed", routes("model/llama", "10.0.0.5:8000"))

	f.src.set("llama")
	f.src.publish()
	wait(t, c, "llama's endpoint is gone", func(c *xdstest.Client) bool { return len(c.Endpoints("model/llama")) == 0 })
	if _, err := c.Route("model/llama"); !errors.Is(err, xdstest.ErrNoHealthyUpstream) {
		t.Fatalf("a request for the unloaded llama: %v, want no healthy upstream", err)
	}
	if got, err := c.Route("model/qwen"); err != nil || got != "10.0.0.6:8000" {
		t.Fatalf("qwen, untouched, routes to %q (%v)", got, err)
	}
}

// TestClusterChangeWarmsAtOnce: vgw sends a version's clusters before its
// assignments, and an Envoy whose cluster changed or is new asks for the
// endpoints again; vgw answers with them, so the clusters warm and the CDS
// ACK comes without waiting for initial_fetch_timeout (15 s): the
// client's clock never moves here, so only vgw's EDS can end the warming.
// A server that did not resend the assignments (go-control-plane #1035)
// would leave the CDS version unacknowledged for ever.
func TestClusterChangeWarmsAtOnce(t *testing.T) {
	src := newModels("llama")
	src.set("llama", "10.0.0.5:8000")
	f := start(t, src)
	c := f.dialWith(t, "envoy-1", xdstest.WithClock(clockwork.NewFakeClock()))
	wait(t, c, "configured", routes("model/llama", "10.0.0.5:8000"))
	v1 := f.srv.Version()
	wait(t, c, "version 1 acknowledged", func(c *xdstest.Client) bool { return c.Acked(resource.ClusterType) == v1 })

	// A config reload: llama's concurrency changes its cluster; qwen is
	// new, and already loaded.
	src.change(func(ms map[string]*xds.Model) {
		ms["llama"].MaxConcurrent = 8
		ms["qwen"] = &xds.Model{Name: "qwen", Cluster: "model/qwen", MaxConcurrent: 4, Endpoints: []string{"10.0.0.6:8000"}}
	})
	f.src.publish()
	v2 := f.newVersion(t, v1)
	wait(t, c, "the clusters acknowledged", func(c *xdstest.Client) bool { return c.Acked(resource.ClusterType) == v2 })
	if c.Warming("model/llama") || c.Warming("model/qwen") || maxRequests(c, "model/llama") != 8 {
		t.Fatalf("acknowledged with a cluster still warming, or llama's old cluster: max_requests %d", maxRequests(c, "model/llama"))
	}
	for cluster, want := range map[string]string{"model/llama": "10.0.0.5:8000", "model/qwen": "10.0.0.6:8000"} {
		if got, err := c.Route(cluster); err != nil || got != want {
			t.Errorf("%s routes to %q (%v), want %s", cluster, got, err, want)
		}
	}
}

// TestReadyModelRoutableWhenReleased: with active health checks, a model
// that becomes ready is routable by the Envoy's workers as soon as
// WaitAcked releases its request, though the Envoy has not checked the
// new host yet: a new host starts failing its check (upstream_impl.cc),
// but as the cluster's lone host it is in panic and gets the traffic
// (load_balancer_impl.cc). Once its first check passes it is healthy,
// on the main thread at once and on the workers after update_merge_window.
func TestReadyModelRoutableWhenReleased(t *testing.T) {
	s := xds.DefaultSettings
	s.HealthCheckInterval = 10 * time.Second
	f := startWith(t, newModels("llama"), s)
	clock := clockwork.NewFakeClock()
	c := f.dialWith(t, "envoy-1", xdstest.WithClock(clock))
	wait(t, c, "configured", func(c *xdstest.Client) bool { return c.Cluster("model/llama") != nil })
	if len(c.Cluster("model/llama").GetHealthChecks()) == 0 {
		t.Fatal("llama's cluster has no health check")
	}

	checks := make(chan struct{}, 4)
	answer := make(chan int, 4)
	model := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/health" {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		checks <- struct{}{}
		select {
		case code := <-answer:
			w.WriteHeader(code)
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(model.Close)
	addr := model.Listener.Addr().String()

	f.src.set("llama", addr)
	f.src.publish()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := f.srv.WaitAcked(ctx, "envoy-1", "llama", at(addr)); err != nil {
		t.Fatal(err)
	}
	if got, err := c.Route("model/llama"); err != nil || got != addr {
		t.Fatalf("released, the request goes to %q (%v), want %s", got, err, addr)
	}
	if h := c.Hosts("model/llama"); len(h) != 1 || !h[0].FailedActiveHC {
		t.Fatalf("the workers have %+v, want the host not yet checked", h)
	}

	select {
	case <-checks:
	case <-time.After(time.Minute):
		t.Fatal("the Envoy never checked the new host")
	}
	answer <- http.StatusOK
	healthy := func(hosts []xdstest.Host) bool { return len(hosts) == 1 && hosts[0].Healthy() }
	wait(t, c, "the main thread has the host healthy", func(c *xdstest.Client) bool { return healthy(c.MainHosts("model/llama")) })
	clock.Advance(time.Second)
	wait(t, c, "the workers have the host healthy", func(c *xdstest.Client) bool { return healthy(c.Hosts("model/llama")) })
}

// TestReconnectGetsTheConfigAgain: an Envoy whose ADS stream broke asks
// again on a new stream with the versions it has. vgw's cache
// (go-control-plane v0.14, simple.go CreateWatch) answers a request naming
// the current version only with resources the stream has not been sent,
// and a new stream has been sent none: so the same vgw sends the whole
// config again at the same version, which the Envoy acknowledges on the
// new stream, and vgw counts it; a restarted vgw, whose versions differ,
// sends it as a new version. Either way the Envoy routed by its kept
// config throughout.
func TestReconnectGetsTheConfigAgain(t *testing.T) {
	for _, tc := range []struct {
		name    string
		restart bool
	}{
		{"the same vgw", false},
		{"a restarted vgw", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := startServing(t, xds.DefaultSettings.AckTimeout)
			c := f.envoy(t, "envoy-2")
			v := f.srv.Version()
			wait(t, c, "configured", func(c *xdstest.Client) bool {
				return c.Acked(resource.ClusterType) == v && c.Acked(resource.EndpointType) == v
			})
			if tc.restart {
				f.serve(t)
			}
			if err := c.Reconnect(context.Background(), f.conn); err != nil {
				t.Fatal(err)
			}
			if got := c.Endpoints("model/llama"); !slices.Equal(got, []string{"10.0.0.5:8000"}) {
				t.Fatalf("reconnecting, the Envoy routes llama to %v", got)
			}
			poll.Until(t, "the new vgw published", func() bool { return f.srv.Version() != "" })
			v = f.srv.Version()
			wait(t, c, "the config acknowledged on the new stream", func(c *xdstest.Client) bool {
				return c.StreamAcked(resource.ClusterType) == v && c.StreamAcked(resource.EndpointType) == v
			})
			poll.Until(t, "vgw counts the new stream's acknowledgement", func() bool {
				for _, n := range must(f.srv.Status()) {
					if n.Node == "envoy-2" {
						return n.Streams == 1 && n.EndpointsVersion == v
					}
				}
				return false
			})
			if !f.srv.Acked("envoy-2", "llama", "10.0.0.5:8000") {
				t.Fatal("vgw does not count the reconnected Envoy as knowing llama's endpoint")
			}
			if got, err := c.Route("model/llama"); err != nil || got != "10.0.0.5:8000" {
				t.Fatalf("llama routes to %q (%v)", got, err)
			}
		})
	}
}

func must(nodes []xds.NodeStatus, _ []xds.NACK) []xds.NodeStatus { return nodes }
