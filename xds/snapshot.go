// Package xds is vgw's xDS control plane: one ADS endpoint from which
// every Envoy learns a cluster per configured model and, through EDS, the
// address of the model's server while it is resident. It records what each
// Envoy has acknowledged, so that a request that waited for a model to
// load is released only once its Envoy knows where to send it.
package xds

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Model is one configured model as Envoy's config needs it.
type Model struct {
	// Name is the model's name, as requests name it.
	Name string
	// Cluster is the Envoy cluster name that ext_proc's x-vgw-cluster
	// names (ClusterName).
	Cluster string
	// MaxConcurrent is how many requests vgw admits for it at once; the
	// cluster's circuit breaker allows as many and no more.
	MaxConcurrent int
	// Endpoints are its servers' host:port while it is resident.
	Endpoints []string
}

// Settings shape every model cluster.
type Settings struct {
	// ConnectTimeout bounds connecting to a model's server.
	ConnectTimeout time.Duration
	// HealthCheckInterval turns on Envoy's active health checks of
	// /health at this interval; 0 leaves them off, as vgw has already
	// checked /health before it publishes an endpoint.
	HealthCheckInterval time.Duration
	// NoEnvoyGrace is how long a request waits for an Envoy when none is
	// connected to xDS (see WaitAcked).
	NoEnvoyGrace time.Duration
	// AckTimeout is how long an Envoy's stream may leave a version
	// unanswered (neither acknowledged nor rejected) before it stops
	// counting as one whose acknowledgement requests wait for (see
	// WaitAcked). An Envoy answers within milliseconds, or, while a
	// changed cluster warms, within its initial_fetch_timeout (15 s by
	// default, eds.cc).
	AckTimeout time.Duration
}

// DefaultSettings are the cluster settings vgw uses unless told otherwise.
var DefaultSettings = Settings{ConnectTimeout: 5 * time.Second, NoEnvoyGrace: 2 * time.Second, AckTimeout: 30 * time.Second}

// UpstreamIdleTimeout closes Envoy's idle connections to a model's server
// before the server does: vLLM's OpenAI server (uvicorn) closes an idle
// keep-alive connection after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), and a
// request Envoy sends on a connection the server is closing fails with 503
// (UC). It bounds idle connections only, never a request or stream.
const UpstreamIdleTimeout = 4 * time.Second

// Build makes the snapshot Envoy is served at version: one EDS cluster per
// model and its load assignment, empty while the model is not resident.
// It is a pure function of its input, checked with Consistent before it is
// returned.
//
// Endpoints come by EDS rather than in each cluster's own load_assignment:
// models come and go all the time, and a changed cluster is rebuilt by
// Envoy, warmed again and its connection pools drained
// (cluster_manager_impl.cc addOrUpdateCluster), while an EDS update only
// adds or removes hosts (eds.cc). Every version carries both the clusters
// and the assignments, and the server sends the clusters first, so a
// cluster Envoy warms again finds its EDS coming (ENVOY-FACTS addendum §9).
func Build(version string, models []Model, s Settings) (*cache.Snapshot, error) {
	sorted := slices.Clone(models)
	slices.SortFunc(sorted, func(a, b Model) int {
		switch {
		case a.Cluster < b.Cluster:
			return -1
		case a.Cluster > b.Cluster:
			return 1
		}
		return 0
	})
	var clusters, assignments []types.Resource
	for _, m := range sorted {
		c, err := cluster(m, s)
		if err != nil {
			return nil, err
		}
		la, err := loadAssignment(m)
		if err != nil {
			return nil, err
		}
		clusters = append(clusters, c)
		assignments = append(assignments, la)
	}
	snap, err := cache.NewSnapshot(version, map[resource.Type][]types.Resource{
		resource.ClusterType:  clusters,
		resource.EndpointType: assignments,
	})
	if err != nil {
		return nil, fmt.Errorf("build xDS snapshot %s: %w", version, err)
	}
	if err := snap.Consistent(); err != nil {
		return nil, fmt.Errorf("xDS snapshot %s is inconsistent: %w", version, err)
	}
	return snap, nil
}

// httpOptions are the upstream HTTP settings of a model cluster: HTTP/1.1,
// which vLLM's OpenAI server (uvicorn) speaks, idle connections closed
// before the server closes them, and no timeout on a stream, so a long SSE
// answer is never cut.
var httpOptions = func() *anypb.Any {
	a, err := anypb.New(&upstreamhttpv3.HttpProtocolOptions{
		CommonHttpProtocolOptions: &corev3.HttpProtocolOptions{
			IdleTimeout: durationpb.New(UpstreamIdleTimeout),
		},
		UpstreamProtocolOptions: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{
					HttpProtocolOptions: &corev3.Http1ProtocolOptions{},
				},
			},
		},
	})
	if err != nil {
		panic(err) // a fixed, valid message: cannot fail
	}
	return a
}()

func cluster(m Model, s Settings) (*clusterv3.Cluster, error) {
	limit := uint32(max(m.MaxConcurrent, 1))
	c := &clusterv3.Cluster{
		Name:                 m.Cluster,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{
			EdsConfig: &corev3.ConfigSource{
				ResourceApiVersion:    corev3.ApiVersion_V3,
				ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
			},
		},
		ConnectTimeout: durationpb.New(s.ConnectTimeout),
		LbPolicy:       clusterv3.Cluster_LEAST_REQUEST,
		// vgw admits at most MaxConcurrent requests; the breaker allows as
		// many, so Envoy never queues or sends more than vgw let through.
		CircuitBreakers: &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{
			MaxRequests:        wrapperspb.UInt32(limit),
			MaxPendingRequests: wrapperspb.UInt32(limit),
			MaxConnections:     wrapperspb.UInt32(max(limit, 1024)),
			MaxRetries:         wrapperspb.UInt32(3),
		}}},
		TypedExtensionProtocolOptions: map[string]*anypb.Any{
			"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": httpOptions,
		},
	}
	if s.HealthCheckInterval > 0 {
		// A host taken out of EDS goes at once, whatever its health checks
		// say (upstream_impl.cc keeps it otherwise while it passes them).
		c.IgnoreHealthOnHostRemoval = true
		c.HealthChecks = []*corev3.HealthCheck{{
			Timeout:            durationpb.New(min(s.HealthCheckInterval, 5*time.Second)),
			Interval:           durationpb.New(s.HealthCheckInterval),
			UnhealthyThreshold: wrapperspb.UInt32(3),
			HealthyThreshold:   wrapperspb.UInt32(1),
			HealthChecker: &corev3.HealthCheck_HttpHealthCheck_{HttpHealthCheck: &corev3.HealthCheck_HttpHealthCheck{
				Path: "/health",
			}},
		}}
	}
	if err := c.ValidateAll(); err != nil {
		return nil, fmt.Errorf("cluster %s: %w", m.Cluster, err)
	}
	return c, nil
}

func loadAssignment(m Model) (*endpointv3.ClusterLoadAssignment, error) {
	la := &endpointv3.ClusterLoadAssignment{ClusterName: m.Cluster}
	if len(m.Endpoints) > 0 {
		lbs := &endpointv3.LocalityLbEndpoints{}
		for _, addr := range m.Endpoints {
			host, portText, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, fmt.Errorf("endpoint %q of %s: %w", addr, m.Cluster, err)
			}
			port, err := strconv.ParseUint(portText, 10, 16)
			if err != nil {
				return nil, fmt.Errorf("endpoint %q of %s: bad port", addr, m.Cluster)
			}
			lbs.LbEndpoints = append(lbs.LbEndpoints, &endpointv3.LbEndpoint{
				// vgw published it only once its /health answered 200.
				HealthStatus: corev3.HealthStatus_HEALTHY,
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
					Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
						Address:       host,
						PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(port)},
					}}},
				}},
			})
		}
		la.Endpoints = []*endpointv3.LocalityLbEndpoints{lbs}
	}
	if err := la.ValidateAll(); err != nil {
		return nil, fmt.Errorf("load assignment of %s: %w", m.Cluster, err)
	}
	return la, nil
}
