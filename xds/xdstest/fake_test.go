package xdstest_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/vgw-project/vgw/xds/xdstest"
)

// patience bounds every wait for something the client does; a test that
// hits it has failed.
const patience = time.Minute

const (
	cds = resource.ClusterType
	eds = resource.EndpointType
)

// fakeADS is an ADS server a test scripts: it sees each request the
// client sends, in order, and sends the responses the test writes.
type fakeADS struct {
	discoverygrpc.UnimplementedAggregatedDiscoveryServiceServer
	streams chan *fakeStream
	conn    *grpc.ClientConn
}

// fakeStream is one ADS stream of a fakeADS.
type fakeStream struct {
	srv    discoverygrpc.AggregatedDiscoveryService_StreamAggregatedResourcesServer
	reqs   chan *discoverygrpc.DiscoveryRequest // closed when the client ends the stream
	end    chan error
	nonces int
	last   map[string]string // type URL → nonce of the last response sent
}

func startFake(t *testing.T) *fakeADS {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeADS{streams: make(chan *fakeStream, 4)}
	g := grpc.NewServer()
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, f)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	f.conn, err = grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.conn.Close() })
	return f
}

func (f *fakeADS) StreamAggregatedResources(srv discoverygrpc.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	st := &fakeStream{srv: srv, reqs: make(chan *discoverygrpc.DiscoveryRequest, 64), end: make(chan error, 1), last: map[string]string{}}
	go func() {
		defer close(st.reqs)
		for {
			r, err := srv.Recv()
			if err != nil {
				return
			}
			st.reqs <- r
		}
	}()
	f.streams <- st
	select {
	case err := <-st.end:
		return err
	case <-srv.Context().Done():
		return nil
	}
}

// dial starts a client as envoy-1.
func (f *fakeADS) dial(t *testing.T, opts ...xdstest.Option) *xdstest.Client {
	t.Helper()
	c, err := xdstest.Dial(context.Background(), f.conn, "envoy-1", opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// stream returns the next stream a client opened.
func (f *fakeADS) stream(t *testing.T) *fakeStream {
	t.Helper()
	select {
	case st := <-f.streams:
		return st
	case <-time.After(patience):
		t.Fatal("no ADS stream was opened")
		return nil
	}
}

// send sends a response of typeURL at version with resources, and
// returns its nonce.
func (st *fakeStream) send(t *testing.T, typeURL, version string, resources ...proto.Message) string {
	t.Helper()
	st.nonces++
	resp := &discoverygrpc.DiscoveryResponse{TypeUrl: typeURL, VersionInfo: version, Nonce: "n" + strconv.Itoa(st.nonces)}
	for _, r := range resources {
		a, err := anypb.New(r)
		if err != nil {
			t.Fatal(err)
		}
		resp.Resources = append(resp.Resources, a)
	}
	if err := st.srv.Send(resp); err != nil {
		t.Fatal(err)
	}
	st.last[typeURL] = resp.Nonce
	return resp.Nonce
}

// req is a request as a test expects it.
type req struct {
	typeURL, version, nonce string
	names                   []string
	nack                    bool
}

func (r req) String() string {
	kind := map[string]string{cds: "CDS", eds: "EDS"}[r.typeURL]
	s := fmt.Sprintf("%s version %q nonce %q names %v", kind, r.version, r.nonce, r.names)
	if r.nack {
		s += " NACK"
	}
	return s
}

// expect fails unless the client's next request on the stream is want.
func (st *fakeStream) expect(t *testing.T, want req) {
	t.Helper()
	select {
	case r, ok := <-st.reqs:
		if !ok {
			t.Fatalf("the stream ended; want %v", want)
		}
		got := req{r.GetTypeUrl(), r.GetVersionInfo(), r.GetResponseNonce(), r.GetResourceNames(), r.GetErrorDetail() != nil}
		if got.typeURL != want.typeURL || got.version != want.version || got.nonce != want.nonce || !slices.Equal(got.names, want.names) || got.nack != want.nack {
			t.Fatalf("request %v, want %v", got, want)
		}
		if r.GetNode().GetId() != "envoy-1" {
			t.Fatalf("request without the node: %v", r)
		}
	case <-time.After(patience):
		t.Fatalf("no request; want %v", want)
	}
}

// ended waits for the client to end the stream.
func (st *fakeStream) ended(t *testing.T) {
	t.Helper()
	for {
		select {
		case _, ok := <-st.reqs:
			if !ok {
				return
			}
		case <-time.After(patience):
			t.Fatal("the client did not end its stream")
		}
	}
}

// edsCluster is an EDS cluster over ADS, as vgw makes them.
func edsCluster(name string, opts ...func(*clusterv3.Cluster)) *clusterv3.Cluster {
	c := &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{EdsConfig: &corev3.ConfigSource{
			ResourceApiVersion:    corev3.ApiVersion_V3,
			ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
		}},
		ConnectTimeout: durationpb.New(5 * time.Second),
	}
	for _, o := range opts {
		o(c)
	}
	return c
}

// connectTimeout changes a cluster, as a config change would.
func connectTimeout(d time.Duration) func(*clusterv3.Cluster) {
	return func(c *clusterv3.Cluster) { c.ConnectTimeout = durationpb.New(d) }
}

// fetchTimeout sets the cluster's initial_fetch_timeout.
func fetchTimeout(d time.Duration) func(*clusterv3.Cluster) {
	return func(c *clusterv3.Cluster) { c.EdsClusterConfig.EdsConfig.InitialFetchTimeout = durationpb.New(d) }
}

// panicThreshold sets the cluster's healthy_panic_threshold.
func panicThreshold(percent float64) func(*clusterv3.Cluster) {
	return func(c *clusterv3.Cluster) {
		c.CommonLbConfig = &clusterv3.Cluster_CommonLbConfig{HealthyPanicThreshold: &typev3.Percent{Value: percent}}
	}
}

// healthChecked gives the cluster vgw's active health check of /health,
// with a timeout of 5 s, and hc's changes.
func healthChecked(hc func(*corev3.HealthCheck)) func(*clusterv3.Cluster) {
	return func(c *clusterv3.Cluster) {
		h := &corev3.HealthCheck{
			Timeout:            durationpb.New(5 * time.Second),
			Interval:           durationpb.New(10 * time.Second),
			UnhealthyThreshold: wrapperspb.UInt32(3),
			HealthyThreshold:   wrapperspb.UInt32(1),
			HealthChecker: &corev3.HealthCheck_HttpHealthCheck_{HttpHealthCheck: &corev3.HealthCheck_HttpHealthCheck{
				Path: "/health",
			}},
		}
		if hc != nil {
			hc(h)
		}
		c.HealthChecks = []*corev3.HealthCheck{h}
		c.IgnoreHealthOnHostRemoval = true
	}
}

// keepHealthyOnRemoval unsets ignore_health_on_host_removal.
func keepHealthyOnRemoval(c *clusterv3.Cluster) { c.IgnoreHealthOnHostRemoval = false }

// endpoint is a host of an assignment, with its EDS health.
type endpoint struct {
	addr   string
	health corev3.HealthStatus
}

func ep(addr string) endpoint { return endpoint{addr, corev3.HealthStatus_HEALTHY} }

// assignment is cluster's load assignment with eps.
func assignment(cluster string, eps ...endpoint) *endpointv3.ClusterLoadAssignment {
	la := &endpointv3.ClusterLoadAssignment{ClusterName: cluster}
	if len(eps) == 0 {
		return la
	}
	l := &endpointv3.LocalityLbEndpoints{}
	for _, e := range eps {
		host, port, err := net.SplitHostPort(e.addr)
		if err != nil {
			panic(err)
		}
		p, _ := strconv.Atoi(port)
		l.LbEndpoints = append(l.LbEndpoints, &endpointv3.LbEndpoint{
			HealthStatus: e.health,
			HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
					Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(p)},
				}}},
			}},
		})
	}
	la.Endpoints = []*endpointv3.LocalityLbEndpoints{l}
	return la
}

// started brings a new client to its first config, as Envoy starts: it
// asks for the clusters, asks for their endpoints and acknowledges the
// clusters at once (the CDS pause applies only after startup), then
// acknowledges the endpoints. clusters is sent at version 1, then las.
func started(t *testing.T, f *fakeADS, c *xdstest.Client, clusters []proto.Message, las ...proto.Message) *fakeStream {
	t.Helper()
	st := f.stream(t)
	st.expect(t, req{typeURL: cds})
	n := st.send(t, cds, "1", clusters...)
	var names []string
	for _, cl := range clusters {
		names = append(names, cl.(*clusterv3.Cluster).GetName())
	}
	slices.Sort(names)
	st.expect(t, req{typeURL: eds, names: names})
	st.expect(t, req{typeURL: cds, version: "1", nonce: n})
	n = st.send(t, eds, "1", las...)
	st.expect(t, req{typeURL: eds, version: "1", nonce: n, names: names})
	wait(t, c, "version 1 acknowledged", func(c *xdstest.Client) bool { return c.Acked(cds) == "1" && c.Acked(eds) == "1" })
	return st
}

// wait waits until cond holds for c.
func wait(t *testing.T, c *xdstest.Client, what string, cond func(*xdstest.Client) bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	if err := c.Wait(ctx, cond); err != nil {
		t.Fatalf("waiting until %s: %v", what, err)
	}
}

// healthServer is a model server's /health whose every answer the test
// gives: each check is seen on checks, and answered with the status sent
// on answers.
type healthServer struct {
	addr    string
	checks  chan string // the path of each check
	answers chan int
}

func startHealth(t *testing.T) *healthServer {
	t.Helper()
	h := &healthServer{checks: make(chan string, 16), answers: make(chan int, 16)}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.checks <- r.URL.Path
		select {
		case code := <-h.answers:
			w.WriteHeader(code)
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(srv.Close)
	h.addr = srv.Listener.Addr().String()
	return h
}

// check waits for the next check and answers it with code (0: leaves it
// unanswered).
func (h *healthServer) check(t *testing.T, code int) {
	t.Helper()
	select {
	case path := <-h.checks:
		if path != "/health" {
			t.Fatalf("checked %s, want /health", path)
		}
	case <-time.After(patience):
		t.Fatal("the host was not checked")
	}
	if code != 0 {
		h.answers <- code
	}
}

// hostsAre says the workers (or the main thread) have exactly hosts, with
// their FailedActiveHC as given.
func hostsAre(got []xdstest.Host, want ...xdstest.Host) bool {
	return slices.EqualFunc(got, want, func(a, b xdstest.Host) bool {
		return a.Addr == b.Addr && a.FailedActiveHC == b.FailedActiveHC && a.PendingRemoval == b.PendingRemoval
	})
}
