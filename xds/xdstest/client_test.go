package xdstest_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/vgw-project/vgw/xds/xdstest"
)

// routesTo fails unless a request for cluster would go to want, by the
// workers' view.
func routesTo(t *testing.T, c *xdstest.Client, cluster, want string) {
	t.Helper()
	if got, err := c.Route(cluster); err != nil || got != want {
		t.Fatalf("a request for %s goes to %q (%v), want %s", cluster, got, err, want)
	}
}

// routeFails fails unless a request for cluster fails with want.
func routeFails(t *testing.T, c *xdstest.Client, cluster string, want error) {
	t.Helper()
	if got, err := c.Route(cluster); !errors.Is(err, want) {
		t.Fatalf("a request for %s goes to %q (%v), want %v", cluster, got, err, want)
	}
}

func endpointsAre(t *testing.T, c *xdstest.Client, cluster string, want ...string) {
	t.Helper()
	if got := c.Endpoints(cluster); !slices.Equal(got, want) {
		t.Fatalf("the workers route %s to %v, want %v", cluster, got, want)
	}
}

// TestStartup: at startup the first clusters are acknowledged at once,
// after the request for their endpoints; a cluster is not routable (NC)
// until its endpoints came, and is as soon as they are acknowledged.
func TestStartup(t *testing.T) {
	f := startFake(t)
	c := f.dial(t)
	st := f.stream(t)
	st.expect(t, req{typeURL: cds})
	n := st.send(t, cds, "1", edsCluster("a"))
	st.expect(t, req{typeURL: eds, names: []string{"a"}})
	st.expect(t, req{typeURL: cds, version: "1", nonce: n})
	routeFails(t, c, "a", xdstest.ErrClusterNotFound)
	n = st.send(t, eds, "1", assignment("a", ep("10.0.0.1:80")))
	st.expect(t, req{typeURL: eds, version: "1", nonce: n, names: []string{"a"}})
	routesTo(t, c, "a", "10.0.0.1:80")
	wait(t, c, "both versions acknowledged", func(c *xdstest.Client) bool { return c.Acked(cds) == "1" && c.Acked(eds) == "1" })
}

// TestRejectedFirstClustersEndStartup: a first CDS response Envoy rejects
// ends its startup all the same (cds_api_impl.cc onConfigUpdateFailed), so
// the clusters that come next warm with CDS paused.
func TestRejectedFirstClustersEndStartup(t *testing.T) {
	f := startFake(t)
	c := f.dial(t)
	c.Reject(cds, "bad cluster")
	st := f.stream(t)
	st.expect(t, req{typeURL: cds})
	n := st.send(t, cds, "1", edsCluster("a"))
	st.expect(t, req{typeURL: cds, nonce: n, nack: true})
	n2 := st.send(t, cds, "2", edsCluster("a"))
	st.expect(t, req{typeURL: eds, names: []string{"a"}})
	n = st.send(t, eds, "1", assignment("a", ep("10.0.0.1:80")))
	st.expect(t, req{typeURL: cds, version: "2", nonce: n2})
	st.expect(t, req{typeURL: eds, version: "1", nonce: n, names: []string{"a"}})
	routesTo(t, c, "a", "10.0.0.1:80")
}

// TestEndpointsOnlyForSubscribedClusters: an EDS response updates only
// the clusters it has assignments for and the client watches
// (grpc_mux_impl.cc processDiscoveryResources). The old harness replaced
// every cluster's endpoints with the response's: a cluster left out lost
// its endpoints, and an unknown one gained some.
func TestEndpointsOnlyForSubscribedClusters(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, st *fakeStream, c *xdstest.Client)
	}{
		{"an assignment of a cluster not subscribed is ignored, its version acknowledged", func(t *testing.T, st *fakeStream, c *xdstest.Client) {
			n := st.send(t, eds, "2", assignment("a", ep("10.0.0.2:80")), assignment("b", ep("10.0.0.9:80")))
			st.expect(t, req{typeURL: eds, version: "2", nonce: n, names: []string{"a"}})
			endpointsAre(t, c, "a", "10.0.0.2:80")
			if c.Endpoints("b") != nil || c.Cluster("b") != nil {
				t.Fatalf("b, never subscribed, has endpoints %v", c.Endpoints("b"))
			}
		}},
		{"a cluster whose assignment is left out keeps its endpoints", func(t *testing.T, st *fakeStream, c *xdstest.Client) {
			n := st.send(t, eds, "2")
			st.expect(t, req{typeURL: eds, version: "2", nonce: n, names: []string{"a"}})
			endpointsAre(t, c, "a", "10.0.0.1:80")
			routesTo(t, c, "a", "10.0.0.1:80")
		}},
		// grpc_mux_impl.cc processDiscoveryResources keys resources by
		// name, keeping the first: the response is taken, not rejected.
		{"a cluster assigned twice in one response takes the first", func(t *testing.T, st *fakeStream, c *xdstest.Client) {
			n := st.send(t, eds, "2", assignment("a", ep("10.0.0.2:80")), assignment("a", ep("10.0.0.3:80")))
			st.expect(t, req{typeURL: eds, version: "2", nonce: n, names: []string{"a"}})
			endpointsAre(t, c, "a", "10.0.0.2:80")
		}},
		{"an empty assignment empties the cluster", func(t *testing.T, st *fakeStream, c *xdstest.Client) {
			n := st.send(t, eds, "2", assignment("a"))
			st.expect(t, req{typeURL: eds, version: "2", nonce: n, names: []string{"a"}})
			endpointsAre(t, c, "a")
			routeFails(t, c, "a", xdstest.ErrNoHealthyUpstream)
		}},
		{"a cluster removed goes with its endpoints; its assignment is not taken", func(t *testing.T, st *fakeStream, c *xdstest.Client) {
			n := st.send(t, cds, "2")
			st.expect(t, req{typeURL: eds, version: "1", nonce: st.last[eds]}) // a's watch went
			st.expect(t, req{typeURL: cds, version: "2", nonce: n})
			if c.Endpoints("a") != nil || c.Cluster("a") != nil || c.MainEndpoints("a") != nil {
				t.Fatalf("a removed, routes to %v", c.Endpoints("a"))
			}
			routeFails(t, c, "a", xdstest.ErrClusterNotFound)
			// With no cluster watching, resources are refused by keeping
			// the version (grpc_mux_impl.cc onDiscoveryResponse).
			n = st.send(t, eds, "2", assignment("a", ep("10.0.0.1:80")))
			st.expect(t, req{typeURL: eds, version: "1", nonce: n})
			if c.Endpoints("a") != nil {
				t.Fatalf("a removed, routes to %v", c.Endpoints("a"))
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := startFake(t)
			c := f.dial(t)
			st := started(t, f, c, []proto.Message{edsCluster("a")}, assignment("a", ep("10.0.0.1:80")))
			tc.run(t, st, c)
		})
	}
}

// TestCDSAcknowledgedOnceClustersWarm: after startup, a CDS response that
// adds or changes clusters is acknowledged only once every warming cluster
// has had its endpoints, and then before the EDS response that warmed the
// last one (cluster_manager_impl.cc updateClusterCounts, onClusterInit;
// grpc_mux_impl.cc onDiscoveryResponse pauses EDS while it applies it).
// The old harness acknowledged the endpoints first.
func TestCDSAcknowledgedOnceClustersWarm(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, st *fakeStream, c *xdstest.Client)
	}{
		{"a new cluster", func(t *testing.T, st *fakeStream, c *xdstest.Client) {
			n2 := st.send(t, cds, "2", edsCluster("a"), edsCluster("b"))
			st.expect(t, req{typeURL: eds, version: "1", nonce: st.last[eds], names: []string{"a", "b"}})
			routeFails(t, c, "b", xdstest.ErrClusterNotFound) // warming
			n := st.send(t, eds, "2", assignment("b", ep("10.0.0.2:80")))
			st.expect(t, req{typeURL: cds, version: "2", nonce: n2})
			st.expect(t, req{typeURL: eds, version: "2", nonce: n, names: []string{"a", "b"}})
			routesTo(t, c, "b", "10.0.0.2:80")
			routesTo(t, c, "a", "10.0.0.1:80")
		}},
		{"a changed cluster serves its previous version until warm", func(t *testing.T, st *fakeStream, c *xdstest.Client) {
			n2 := st.send(t, cds, "2", edsCluster("a", connectTimeout(time.Second)))
			st.expect(t, req{typeURL: eds, version: "1", nonce: st.last[eds], names: []string{"a"}})
			if got := c.Cluster("a").GetConnectTimeout().AsDuration(); got != 5*time.Second || !c.Warming("a") {
				t.Fatalf("while the change warms, the workers have a with connect_timeout %v", got)
			}
			routesTo(t, c, "a", "10.0.0.1:80")
			n := st.send(t, eds, "2", assignment("a", ep("10.0.0.2:80")))
			st.expect(t, req{typeURL: cds, version: "2", nonce: n2})
			st.expect(t, req{typeURL: eds, version: "2", nonce: n, names: []string{"a"}})
			if got := c.Cluster("a").GetConnectTimeout().AsDuration(); got != time.Second {
				t.Fatalf("warm, the workers have a with connect_timeout %v", got)
			}
			endpointsAre(t, c, "a", "10.0.0.2:80")
		}},
		{"the acknowledgement waits for every warming cluster", func(t *testing.T, st *fakeStream, c *xdstest.Client) {
			n2 := st.send(t, cds, "2", edsCluster("a"), edsCluster("b"), edsCluster("c"))
			st.expect(t, req{typeURL: eds, version: "1", nonce: st.last[eds], names: []string{"a", "b", "c"}})
			n := st.send(t, eds, "2", assignment("b", ep("10.0.0.2:80")))
			st.expect(t, req{typeURL: eds, version: "2", nonce: n, names: []string{"a", "b", "c"}}) // no CDS ACK yet
			routesTo(t, c, "b", "10.0.0.2:80")
			routeFails(t, c, "c", xdstest.ErrClusterNotFound)
			n = st.send(t, eds, "3", assignment("c"))
			st.expect(t, req{typeURL: cds, version: "2", nonce: n2})
			st.expect(t, req{typeURL: eds, version: "3", nonce: n, names: []string{"a", "b", "c"}})
			routeFails(t, c, "c", xdstest.ErrNoHealthyUpstream) // warm with no host
		}},
		{"a CDS response while clusters warm is acknowledged with them", func(t *testing.T, st *fakeStream, c *xdstest.Client) {
			st.send(t, cds, "2", edsCluster("a"), edsCluster("b"))
			st.expect(t, req{typeURL: eds, version: "1", nonce: st.last[eds], names: []string{"a", "b"}})
			n3 := st.send(t, cds, "3", edsCluster("a"), edsCluster("b"), edsCluster("c"))
			st.expect(t, req{typeURL: eds, version: "1", nonce: st.last[eds], names: []string{"a", "b", "c"}})
			n := st.send(t, eds, "2", assignment("b"), assignment("c"))
			st.expect(t, req{typeURL: cds, version: "3", nonce: n3})
			st.expect(t, req{typeURL: eds, version: "2", nonce: n, names: []string{"a", "b", "c"}})
		}},
		{"unchanged clusters are acknowledged at once, with no EDS request", func(t *testing.T, st *fakeStream, c *xdstest.Client) {
			n := st.send(t, cds, "2", edsCluster("a"))
			st.expect(t, req{typeURL: cds, version: "2", nonce: n})
		}},
		{"a rejected EDS response ends the warming, without hosts", func(t *testing.T, st *fakeStream, c *xdstest.Client) {
			n2 := st.send(t, cds, "2", edsCluster("a"), edsCluster("b"))
			st.expect(t, req{typeURL: eds, version: "1", nonce: st.last[eds], names: []string{"a", "b"}})
			c.Reject(eds, "bad endpoint")
			n := st.send(t, eds, "2", assignment("b", ep("10.0.0.2:80")))
			st.expect(t, req{typeURL: cds, version: "2", nonce: n2})
			st.expect(t, req{typeURL: eds, version: "1", nonce: n, names: []string{"a", "b"}, nack: true})
			routeFails(t, c, "b", xdstest.ErrNoHealthyUpstream)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := startFake(t)
			c := f.dial(t)
			st := started(t, f, c, []proto.Message{edsCluster("a")}, assignment("a", ep("10.0.0.1:80")))
			tc.run(t, st, c)
		})
	}
}

// TestInitialFetchTimeout: a warming cluster whose endpoints never come
// becomes active when its initial_fetch_timeout runs out, and the held
// CDS ACK goes then (grpc_subscription_impl.cc start; eds.cc
// onConfigUpdateFailed). A new cluster has no hosts then; a changed one
// takes the assignment last received for it, from the SotW ADS mux's EDS
// cache. Until then a new cluster is not routable (NC) and a changed one
// serves its previous version.
func TestInitialFetchTimeout(t *testing.T) {
	for _, tc := range []struct {
		name    string
		cluster *clusterv3.Cluster
		timeout time.Duration // 0: waits for ever
		want    []string      // the cluster's endpoints once warm
	}{
		{"a new cluster goes on without hosts", edsCluster("b"), 15 * time.Second, []string{}},
		{"a changed cluster goes on with the endpoints it had", edsCluster("a", connectTimeout(time.Second)), 15 * time.Second, []string{"10.0.0.1:80"}},
		{"the cluster's own initial_fetch_timeout", edsCluster("b", fetchTimeout(2*time.Second)), 2 * time.Second, []string{}},
		{"an initial_fetch_timeout of 0 waits for ever", edsCluster("b", fetchTimeout(0)), 0, []string{"10.0.0.2:80"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := clockwork.NewFakeClock()
			f := startFake(t)
			c := f.dial(t, xdstest.WithClock(clock))
			st := started(t, f, c, []proto.Message{edsCluster("a")}, assignment("a", ep("10.0.0.1:80")))
			name := tc.cluster.GetName()
			clusters := []proto.Message{tc.cluster}
			if name != "a" {
				clusters = []proto.Message{edsCluster("a"), tc.cluster}
			}
			n2 := st.send(t, cds, "2", clusters...)
			names := []string{"a"}
			if name != "a" {
				names = append(names, name)
			}
			st.expect(t, req{typeURL: eds, version: "1", nonce: st.last[eds], names: names})

			short := tc.timeout - time.Millisecond
			if tc.timeout == 0 {
				short = 24 * time.Hour
			}
			clock.Advance(short)
			if !c.Warming(name) || c.Acked(cds) != "1" {
				t.Fatalf("%v on: warming %v, CDS acknowledged %q; want still warming, 1", short, c.Warming(name), c.Acked(cds))
			}
			if name == "a" {
				if got := c.Cluster("a").GetConnectTimeout().AsDuration(); got != 5*time.Second {
					t.Fatalf("while the change warms, the workers have a with connect_timeout %v", got)
				}
				routesTo(t, c, "a", "10.0.0.1:80")
			} else {
				routeFails(t, c, name, xdstest.ErrClusterNotFound)
			}

			if tc.timeout == 0 {
				n := st.send(t, eds, "2", assignment(name, ep("10.0.0.2:80")))
				st.expect(t, req{typeURL: cds, version: "2", nonce: n2})
				st.expect(t, req{typeURL: eds, version: "2", nonce: n, names: names})
			} else {
				clock.Advance(time.Millisecond)
				st.expect(t, req{typeURL: cds, version: "2", nonce: n2})
			}
			if c.Warming(name) || c.Cluster(name) == nil || !proto.Equal(c.Cluster(name), tc.cluster) {
				t.Fatalf("the workers have %s as %v, want the new version", name, c.Cluster(name))
			}
			if got := c.Endpoints(name); !slices.Equal(got, tc.want) {
				t.Fatalf("%s routes to %v, want %v", name, got, tc.want)
			}
		})
	}
}

// TestReconnect: Envoy keeps its config across a broken ADS stream, and
// on the new one asks again for each subscription with the last version
// it accepted, no nonce and the resources it wants, CDS first; while
// clusters warm CDS is paused, so EDS goes first (grpc_mux_impl.cc
// onStreamEstablished, clearNonce). The old harness started again from
// nothing.
func TestReconnect(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, f *fakeADS, st *fakeStream, c *xdstest.Client)
	}{
		{"keeps its config and asks again with the versions it accepted", func(t *testing.T, f *fakeADS, st *fakeStream, c *xdstest.Client) {
			if err := c.Reconnect(context.Background(), f.conn); err != nil {
				t.Fatal(err)
			}
			st.ended(t)
			st2 := f.stream(t)
			st2.expect(t, req{typeURL: cds, version: "1"})
			st2.expect(t, req{typeURL: eds, version: "1", names: []string{"a"}})
			routesTo(t, c, "a", "10.0.0.1:80")
			if c.StreamAcked(cds) != "" || c.Acked(cds) != "1" {
				t.Fatalf("before any response on the new stream: acknowledged %q on it, %q in all", c.StreamAcked(cds), c.Acked(cds))
			}
			n := st2.send(t, cds, "1", edsCluster("a"))
			st2.expect(t, req{typeURL: cds, version: "1", nonce: n})
			n = st2.send(t, eds, "1", assignment("a", ep("10.0.0.1:80")))
			st2.expect(t, req{typeURL: eds, version: "1", nonce: n, names: []string{"a"}})
			wait(t, c, "acknowledged on the new stream", func(c *xdstest.Client) bool { return c.StreamAcked(eds) == "1" })
		}},
		{"while a cluster warms, it asks for the endpoints first", func(t *testing.T, f *fakeADS, st *fakeStream, c *xdstest.Client) {
			st.send(t, cds, "2", edsCluster("a"), edsCluster("b"))
			st.expect(t, req{typeURL: eds, version: "1", nonce: st.last[eds], names: []string{"a", "b"}})
			if err := c.Reconnect(context.Background(), f.conn); err != nil {
				t.Fatal(err)
			}
			st2 := f.stream(t)
			st2.expect(t, req{typeURL: eds, version: "1", names: []string{"a", "b"}})
			n := st2.send(t, eds, "2", assignment("b", ep("10.0.0.2:80")))
			st2.expect(t, req{typeURL: cds, version: "2"})
			st2.expect(t, req{typeURL: eds, version: "2", nonce: n, names: []string{"a", "b"}})
			routesTo(t, c, "b", "10.0.0.2:80")
		}},
		{"Hold ends: what it held came on the old stream", func(t *testing.T, f *fakeADS, st *fakeStream, c *xdstest.Client) {
			c.Hold(eds)
			st.send(t, eds, "2", assignment("a", ep("10.0.0.2:80")))
			if err := c.Reconnect(context.Background(), f.conn); err != nil {
				t.Fatal(err)
			}
			st2 := f.stream(t)
			st2.expect(t, req{typeURL: cds, version: "1"})
			st2.expect(t, req{typeURL: eds, version: "1", names: []string{"a"}})
			endpointsAre(t, c, "a", "10.0.0.1:80")
			n := st2.send(t, eds, "2", assignment("a", ep("10.0.0.2:80")))
			st2.expect(t, req{typeURL: eds, version: "2", nonce: n, names: []string{"a"}})
			endpointsAre(t, c, "a", "10.0.0.2:80")
		}},
		{"a stream that breaks leaves the config", func(t *testing.T, f *fakeADS, st *fakeStream, c *xdstest.Client) {
			st.end <- status.Error(codes.Unavailable, "control plane restarting")
			ctx, cancel := context.WithTimeout(context.Background(), patience)
			defer cancel()
			if err := c.Wait(ctx, func(*xdstest.Client) bool { return false }); status.Code(err) != codes.Unavailable {
				t.Fatalf("Wait on a broken stream: %v", err)
			}
			routesTo(t, c, "a", "10.0.0.1:80")
			if err := c.Reconnect(context.Background(), f.conn); err != nil {
				t.Fatal(err)
			}
			if c.Err() != nil {
				t.Fatalf("reconnected, the client still reports %v", c.Err())
			}
			st2 := f.stream(t)
			st2.expect(t, req{typeURL: cds, version: "1"})
			st2.expect(t, req{typeURL: eds, version: "1", names: []string{"a"}})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := startFake(t)
			c := f.dial(t)
			st := started(t, f, c, []proto.Message{edsCluster("a")}, assignment("a", ep("10.0.0.1:80")))
			tc.run(t, f, st, c)
		})
	}
}

// TestPanicRouting: the router picks among healthy hosts, unless their
// share is under healthy_panic_threshold (50% by default): then the
// cluster is in panic and every host is eligible, so a lone unhealthy
// host still gets the traffic; only an empty host set is "no healthy
// upstream" (load_balancer_impl.cc isHostSetInPanic, hostSourceToUse;
// upstream_impl.cc setEdsHealthFlag, excludeBasedOnHealthFlag: a draining
// host is left out of the counts).
func TestPanicRouting(t *testing.T) {
	const (
		unhealthy = corev3.HealthStatus_UNHEALTHY
		timeout   = corev3.HealthStatus_TIMEOUT
		draining  = corev3.HealthStatus_DRAINING
		degraded  = corev3.HealthStatus_DEGRADED
	)
	for _, tc := range []struct {
		name      string
		threshold float64 // -1: the default
		eps       []endpoint
		want      string
		wantErr   error
	}{
		{"a lone healthy host", -1, []endpoint{ep("10.0.0.1:80")}, "10.0.0.1:80", nil},
		{"no host: no healthy upstream", -1, nil, "", xdstest.ErrNoHealthyUpstream},
		{"a lone unhealthy host: panic", -1, []endpoint{{"10.0.0.1:80", unhealthy}}, "10.0.0.1:80", nil},
		{"a lone timed-out host: panic", -1, []endpoint{{"10.0.0.1:80", timeout}}, "10.0.0.1:80", nil},
		{"half healthy: no panic", -1, []endpoint{{"10.0.0.1:80", unhealthy}, ep("10.0.0.2:80")}, "10.0.0.2:80", nil},
		{"a third healthy: panic, every host", -1, []endpoint{{"10.0.0.1:80", unhealthy}, {"10.0.0.2:80", unhealthy}, ep("10.0.0.3:80")}, "10.0.0.1:80", nil},
		{"a draining host is left out of the count", -1, []endpoint{{"10.0.0.1:80", draining}, ep("10.0.0.2:80")}, "10.0.0.2:80", nil},
		{"a lone draining host: panic", -1, []endpoint{{"10.0.0.1:80", draining}}, "10.0.0.1:80", nil},
		{"a degraded host when none is healthy", -1, []endpoint{{"10.0.0.1:80", degraded}}, "10.0.0.1:80", nil},
		{"a third healthy under a threshold of 30%: no panic", 30, []endpoint{{"10.0.0.1:80", unhealthy}, {"10.0.0.2:80", unhealthy}, ep("10.0.0.3:80")}, "10.0.0.3:80", nil},
		{"no panic at threshold 0: a lone unhealthy host is no healthy upstream", 0, []endpoint{{"10.0.0.1:80", unhealthy}}, "", xdstest.ErrNoHealthyUpstream},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cl := edsCluster("a")
			if tc.threshold >= 0 {
				cl = edsCluster("a", panicThreshold(tc.threshold))
			}
			f := startFake(t)
			c := f.dial(t)
			started(t, f, c, []proto.Message{cl}, assignment("a", tc.eps...))
			if tc.wantErr != nil {
				routeFails(t, c, "a", tc.wantErr)
				return
			}
			routesTo(t, c, "a", tc.want)
		})
	}
}

// TestHealthCheckWarming: a new cluster with active health checks whose
// endpoints have hosts stays warming until each host's first check ends,
// pass or fail (upstream_impl.cc onInitDone), so the EDS ACK goes first
// and the CDS ACK once checked. The check is a real GET of the path,
// bounded by the check's timeout on the client's clock. A host that
// failed is routed to anyway, the lone host of a cluster in panic.
func TestHealthCheckWarming(t *testing.T) {
	for _, tc := range []struct {
		name       string
		answer     int // 0: none, the check times out
		wantFailed bool
	}{
		{"the first check passes", 200, false},
		{"the first check fails", 503, true},
		{"the first check times out", 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := clockwork.NewFakeClock()
			f := startFake(t)
			c := f.dial(t, xdstest.WithClock(clock))
			st := started(t, f, c, []proto.Message{edsCluster("a")}, assignment("a", ep("10.0.0.1:80")))
			hs := startHealth(t)
			n2 := st.send(t, cds, "2", edsCluster("a"), edsCluster("b", healthChecked(nil)))
			st.expect(t, req{typeURL: eds, version: "1", nonce: st.last[eds], names: []string{"a", "b"}})
			n := st.send(t, eds, "2", assignment("b", ep(hs.addr)))
			st.expect(t, req{typeURL: eds, version: "2", nonce: n, names: []string{"a", "b"}})
			routeFails(t, c, "b", xdstest.ErrClusterNotFound)
			hs.check(t, tc.answer)
			if tc.answer == 0 {
				clock.Advance(5 * time.Second)
			}
			st.expect(t, req{typeURL: cds, version: "2", nonce: n2})
			if got := c.Hosts("b"); !hostsAre(got, xdstest.Host{Addr: hs.addr, FailedActiveHC: tc.wantFailed}) {
				t.Fatalf("the workers have b's hosts %+v, want %s failing %v", got, hs.addr, tc.wantFailed)
			}
			routesTo(t, c, "b", hs.addr)
		})
	}
}

// TestNewHostHealth: a host added to an active health-checked cluster
// starts failing its active check whatever EDS says, and reaches the
// workers at once, with the EDS ACK, routable as the lone host in panic
// (upstream_impl.cc updateDynamicHostList; cluster_manager_impl.cc posts
// adds at once). Its first check runs at once; a pass clears the flag on
// the main thread at once, but reaches the workers only when
// update_merge_window (1 s) has passed since the add was posted
// (cluster_manager_impl.cc scheduleUpdate), or at once when it comes
// later than that.
func TestNewHostHealth(t *testing.T) {
	for _, tc := range []struct {
		name       string
		passAfter  time.Duration // after the add was posted
		wantMerged bool
	}{
		{"a pass within the merge window reaches the workers when it ends", 0, true},
		{"a pass after the merge window reaches them at once", 1500 * time.Millisecond, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := clockwork.NewFakeClock()
			f := startFake(t)
			c := f.dial(t, xdstest.WithClock(clock))
			st := started(t, f, c, []proto.Message{edsCluster("b", healthChecked(nil))}, assignment("b"))
			hs := startHealth(t)
			n := st.send(t, eds, "2", assignment("b", ep(hs.addr)))
			st.expect(t, req{typeURL: eds, version: "2", nonce: n, names: []string{"b"}})
			failing := xdstest.Host{Addr: hs.addr, FailedActiveHC: true}
			if got := c.Hosts("b"); !hostsAre(got, failing) {
				t.Fatalf("when the EDS ACK is sent the workers have %+v, want %s failing its check", got, hs.addr)
			}
			routesTo(t, c, "b", hs.addr)

			hs.check(t, 0)
			clock.Advance(tc.passAfter)
			hs.answers <- 200
			passing := xdstest.Host{Addr: hs.addr}
			wait(t, c, "the main thread has the pass", func(c *xdstest.Client) bool { return hostsAre(c.MainHosts("b"), passing) })
			if !tc.wantMerged {
				if got := c.Hosts("b"); !hostsAre(got, passing) {
					t.Fatalf("past the merge window the workers have %+v, want the pass", got)
				}
				return
			}
			clock.Advance(time.Second - time.Millisecond)
			if got := c.Hosts("b"); !hostsAre(got, failing) {
				t.Fatalf("within the merge window the workers have %+v, want the host still failing", got)
			}
			clock.Advance(time.Millisecond)
			wait(t, c, "the workers have the pass", func(c *xdstest.Client) bool { return hostsAre(c.Hosts("b"), passing) })
		})
	}
}

// TestHostRemoval: with ignore_health_on_host_removal (vgw sets it) a host
// gone from EDS goes at once; without it, a host still passing its checks
// stays until it fails one (upstream_impl.cc updateDynamicHostList; eds.cc
// reloadHealthyHostsHelper).
func TestHostRemoval(t *testing.T) {
	for _, tc := range []struct {
		name   string
		ignore bool
	}{
		{"ignore_health_on_host_removal: at once", true},
		{"otherwise: once it fails a check", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := clockwork.NewFakeClock()
			f := startFake(t)
			c := f.dial(t, xdstest.WithClock(clock))
			hs := startHealth(t)
			cl := edsCluster("b", healthChecked(nil))
			if !tc.ignore {
				keepHealthyOnRemoval(cl)
			}
			st := started(t, f, c, []proto.Message{cl}, assignment("b", ep(hs.addr)))
			hs.check(t, 200)
			passing := xdstest.Host{Addr: hs.addr}
			wait(t, c, "b is warm", func(c *xdstest.Client) bool { return hostsAre(c.Hosts("b"), passing) })

			n := st.send(t, eds, "2", assignment("b"))
			st.expect(t, req{typeURL: eds, version: "2", nonce: n, names: []string{"b"}})
			if tc.ignore {
				endpointsAre(t, c, "b")
				return
			}
			endpointsAre(t, c, "b", hs.addr)
			if got := c.MainHosts("b"); !hostsAre(got, xdstest.Host{Addr: hs.addr, PendingRemoval: true}) {
				t.Fatalf("the main thread has %+v, want the host pending removal", got)
			}
			clock.Advance(60 * time.Second) // no_traffic_interval: the cluster has had no traffic
			hs.check(t, 503)
			wait(t, c, "the failing host is gone", func(c *xdstest.Client) bool { return len(c.Endpoints("b")) == 0 })
		})
	}
}

// TestHealthCheckInterval: after the first check, a host is checked again
// every no_traffic_interval while its cluster has had no traffic, and
// every interval once it has (health_checker_base_impl.cc interval).
func TestHealthCheckInterval(t *testing.T) {
	for _, tc := range []struct {
		name                string
		traffic             bool
		interval, noTraffic time.Duration
	}{
		{"no traffic: no_traffic_interval", false, 30 * time.Second, 5 * time.Second},
		{"traffic: interval", true, 5 * time.Second, 30 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := clockwork.NewFakeClock()
			f := startFake(t)
			c := f.dial(t, xdstest.WithClock(clock))
			hs := startHealth(t)
			cl := edsCluster("b", healthChecked(func(h *corev3.HealthCheck) {
				h.Interval = durationpb.New(tc.interval)
				h.NoTrafficInterval = durationpb.New(tc.noTraffic)
			}))
			started(t, f, c, []proto.Message{cl}, assignment("b", ep(hs.addr)))
			hs.check(t, 200)
			wait(t, c, "b is warm", func(c *xdstest.Client) bool { return c.Cluster("b") != nil })
			if tc.traffic {
				routesTo(t, c, "b", hs.addr)
			}
			// The second check was timed before any traffic. It fails, so
			// that the client is seen to have taken it.
			clock.Advance(tc.noTraffic)
			hs.check(t, 503)
			wait(t, c, "the second check failed", func(c *xdstest.Client) bool {
				return hostsAre(c.MainHosts("b"), xdstest.Host{Addr: hs.addr, FailedActiveHC: true})
			})
			// The third comes 5 s on, at the interval the traffic calls for
			// (unhealthy_interval defaults to interval); at the other, 30 s,
			// it would not come.
			clock.Advance(5 * time.Second)
			hs.check(t, 200)
		})
	}
}
