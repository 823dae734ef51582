// Package xdstest plays an Envoy's xDS client against an ADS server, over
// real gRPC, for tests and benchmarks on machines without Envoy.
//
// A Client subscribes as Envoy does over ADS (state of the world): a
// wildcard CDS request, then for the clusters it got an EDS request naming
// them, acknowledging each response with its version and nonce or
// rejecting it with an error detail (grpc_mux_impl.cc). At startup Envoy
// acknowledges the first CDS response at once and asks for EDS; later CDS
// responses are acknowledged once the clusters' EDS has arrived
// (cluster_manager_impl.cc pauses CDS while clusters warm). The Client
// keeps what it was told, so a test can ask where a cluster routes.
package xdstest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// Client is one Envoy's ADS stream.
type Client struct {
	node   string
	stream discoverygrpc.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	cancel context.CancelFunc
	done   chan struct{}

	mu        sync.Mutex
	clusters  map[string]*clusterv3.Cluster
	endpoints map[string][]string // cluster → host:port
	acked     map[string]string   // type URL → version
	nonces    map[string]string   // type URL → last nonce
	reject    map[string]string   // type URL → error detail for the next response
	hold      map[string]bool     // type URL → responses held unapplied; see Hold
	changed   chan struct{}
	err       error

	released chan string // type URLs whose held responses go on; see Release
}

// An Option sets up a Client before its stream starts.
type Option func(*Client)

// Holding makes the client hold the responses of typeURL from the start
// (see Hold).
func Holding(typeURL string) Option { return func(c *Client) { c.hold[typeURL] = true } }

// Dial opens an ADS stream on conn as Envoy node id and subscribes.
func Dial(ctx context.Context, conn grpc.ClientConnInterface, node string, opts ...Option) (*Client, error) {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		cancel()
		return nil, err
	}
	c := &Client{
		node: node, stream: stream, cancel: cancel, done: make(chan struct{}),
		clusters: map[string]*clusterv3.Cluster{}, endpoints: map[string][]string{},
		acked: map[string]string{}, nonces: map[string]string{}, reject: map[string]string{}, hold: map[string]bool{},
		changed: make(chan struct{}), released: make(chan string, 8),
	}
	for _, o := range opts {
		o(c)
	}
	if err := c.send(resource.ClusterType, "", "", nil, nil); err != nil {
		cancel()
		return nil, err
	}
	go c.run()
	return c, nil
}

// Close ends the stream, as an Envoy shutting down or losing its connection.
func (c *Client) Close() {
	c.cancel()
	<-c.done
}

func (c *Client) send(typeURL, version, nonce string, names []string, detail *status.Status) error {
	return c.stream.Send(&discoverygrpc.DiscoveryRequest{
		Node: &corev3.Node{Id: c.node, Cluster: "vgw"}, TypeUrl: typeURL,
		VersionInfo: version, ResponseNonce: nonce, ResourceNames: names, ErrorDetail: detail,
	})
}

// Reject makes the client reject the next response of typeURL with detail.
func (c *Client) Reject(typeURL, detail string) {
	c.mu.Lock()
	c.reject[typeURL] = detail
	c.mu.Unlock()
}

// Hold makes the client leave the responses of typeURL it gets from now
// on unapplied and unanswered, as an Envoy that is slow to take up a
// config (busy, or warming clusters) does, until Release.
func (c *Client) Hold(typeURL string) {
	c.mu.Lock()
	c.hold[typeURL] = true
	c.mu.Unlock()
}

// Release ends Hold: the last response held is applied and answered.
func (c *Client) Release(typeURL string) {
	c.mu.Lock()
	delete(c.hold, typeURL)
	c.mu.Unlock()
	c.released <- typeURL
}

func (c *Client) run() {
	defer close(c.done)
	warmed := false // the first CDS response is acknowledged at once
	var pendingCDS *discoverygrpc.DiscoveryResponse
	resps := make(chan *discoverygrpc.DiscoveryResponse)
	failed := make(chan error, 1)
	go func() {
		for {
			resp, err := c.stream.Recv()
			if err != nil {
				failed <- err
				return
			}
			select {
			case resps <- resp:
			case <-c.done:
				return
			}
		}
	}()
	held := map[string]*discoverygrpc.DiscoveryResponse{}
	for {
		var resp *discoverygrpc.DiscoveryResponse
		select {
		case resp = <-resps:
		case err := <-failed:
			c.fail(err)
			return
		case typeURL := <-c.released:
			resp = held[typeURL]
			delete(held, typeURL)
			if resp == nil {
				continue
			}
		}
		c.mu.Lock()
		if c.hold[resp.GetTypeUrl()] {
			c.mu.Unlock()
			held[resp.GetTypeUrl()] = resp
			continue
		}
		detail, reject := c.reject[resp.GetTypeUrl()]
		delete(c.reject, resp.GetTypeUrl())
		acked := c.acked[resp.GetTypeUrl()]
		c.mu.Unlock()
		if reject {
			// Envoy keeps its version but takes the nonce of what it
			// rejects (grpc_mux_impl.cc).
			c.mu.Lock()
			c.nonce(resp)
			c.mu.Unlock()
			if err := c.send(resp.GetTypeUrl(), acked, resp.GetNonce(), c.subscribed(resp.GetTypeUrl()), &status.Status{Code: 3, Message: detail}); err != nil {
				c.fail(err)
				return
			}
			continue
		}
		switch resp.GetTypeUrl() {
		case resource.ClusterType:
			names, warming, err := c.applyClusters(resp)
			if err != nil {
				c.fail(err)
				return
			}
			// Ask for the clusters' endpoints, then acknowledge the
			// clusters: at once the first time, or when none is new or
			// changed; else once their EDS came, as Envoy pauses CDS while
			// clusters warm.
			c.mu.Lock()
			version := c.acked[resource.EndpointType]
			c.mu.Unlock()
			if err := c.send(resource.EndpointType, version, c.lastNonce(resource.EndpointType), names, nil); err != nil {
				c.fail(err)
				return
			}
			if !warmed || !warming {
				warmed = true
				if err := c.ack(resp); err != nil {
					c.fail(err)
					return
				}
			} else {
				pendingCDS = resp
			}
		case resource.EndpointType:
			if err := c.applyEndpoints(resp); err != nil {
				c.fail(err)
				return
			}
			if err := c.ack(resp); err != nil {
				c.fail(err)
				return
			}
			if pendingCDS != nil {
				if err := c.ack(pendingCDS); err != nil {
					c.fail(err)
					return
				}
				pendingCDS = nil
			}
		}
	}
}

// lastNonce is the last nonce received for typeURL, which Envoy echoes.
func (c *Client) lastNonce(typeURL string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nonces[typeURL]
}

// nonce records resp's nonce; c.mu is held.
func (c *Client) nonce(resp *discoverygrpc.DiscoveryResponse) {
	c.nonces[resp.GetTypeUrl()] = resp.GetNonce()
}

// ack acknowledges resp, and only then tells waiters: what they see has
// been acknowledged, though the server may not have read it yet.
func (c *Client) ack(resp *discoverygrpc.DiscoveryResponse) error {
	err := c.send(resp.GetTypeUrl(), resp.GetVersionInfo(), resp.GetNonce(), c.subscribed(resp.GetTypeUrl()), nil)
	c.mu.Lock()
	c.acked[resp.GetTypeUrl()] = resp.GetVersionInfo()
	c.signalLocked()
	c.mu.Unlock()
	return err
}

func (c *Client) subscribed(typeURL string) []string {
	if typeURL != resource.EndpointType {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	names := make([]string, 0, len(c.clusters))
	for n := range c.clusters {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// applyClusters takes a CDS response. warming says a cluster is new or
// changed, which Envoy warms before it acknowledges the response.
func (c *Client) applyClusters(resp *discoverygrpc.DiscoveryResponse) (names []string, warming bool, err error) {
	next := map[string]*clusterv3.Cluster{}
	for _, a := range resp.GetResources() {
		cl := &clusterv3.Cluster{}
		if err := a.UnmarshalTo(cl); err != nil {
			return nil, false, fmt.Errorf("decode cluster: %w", err)
		}
		if err := cl.ValidateAll(); err != nil {
			return nil, false, fmt.Errorf("cluster %s is invalid: %w", cl.GetName(), err)
		}
		next[cl.GetName()] = cl
	}
	c.mu.Lock()
	for name, cl := range next {
		if old := c.clusters[name]; old == nil || !proto.Equal(old, cl) {
			warming = true
		}
	}
	c.clusters = next
	for name := range c.endpoints {
		if next[name] == nil {
			delete(c.endpoints, name)
		}
	}
	c.nonce(resp)
	c.mu.Unlock()
	names = make([]string, 0, len(next))
	for n := range next {
		names = append(names, n)
	}
	slices.Sort(names)
	return names, warming, nil
}

func (c *Client) applyEndpoints(resp *discoverygrpc.DiscoveryResponse) error {
	next := map[string][]string{}
	for _, a := range resp.GetResources() {
		la := &endpointv3.ClusterLoadAssignment{}
		if err := a.UnmarshalTo(la); err != nil {
			return fmt.Errorf("decode load assignment: %w", err)
		}
		if err := la.ValidateAll(); err != nil {
			return fmt.Errorf("load assignment %s is invalid: %w", la.GetClusterName(), err)
		}
		var eps []string
		for _, l := range la.GetEndpoints() {
			for _, e := range l.GetLbEndpoints() {
				sa := e.GetEndpoint().GetAddress().GetSocketAddress()
				eps = append(eps, sa.GetAddress()+":"+strconv.Itoa(int(sa.GetPortValue())))
			}
		}
		next[la.GetClusterName()] = eps
	}
	c.mu.Lock()
	c.endpoints = next
	c.nonce(resp)
	c.mu.Unlock()
	return nil
}

func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err == nil && !errors.Is(err, context.Canceled) {
		c.err = err
	}
	c.signalLocked()
	c.mu.Unlock()
}

func (c *Client) signalLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// Endpoints returns where the client would route cluster now.
func (c *Client) Endpoints(cluster string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.endpoints[cluster])
}

// Cluster returns a cluster the client was given.
func (c *Client) Cluster(name string) *clusterv3.Cluster {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.clusters[name]
}

// Acked returns the version last acknowledged for typeURL.
func (c *Client) Acked(typeURL string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.acked[typeURL]
}

// Wait returns once cond holds (checked after every acknowledgement) or
// ctx ends.
func (c *Client) Wait(ctx context.Context, cond func(*Client) bool) error {
	for {
		c.mu.Lock()
		ch, err := c.changed, c.err
		c.mu.Unlock()
		if cond(c) {
			return nil
		}
		if err != nil {
			return err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Silent opens an ADS stream on conn as node that asks for the clusters
// and then reads what it is sent without ever acknowledging or rejecting
// it: a stuck Envoy, or an impostor on the xDS port. It lasts until ctx
// ends.
func Silent(ctx context.Context, conn grpc.ClientConnInterface, node string) error {
	stream, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return err
	}
	if err := stream.Send(&discoverygrpc.DiscoveryRequest{Node: &corev3.Node{Id: node}, TypeUrl: resource.ClusterType}); err != nil {
		return err
	}
	go func() {
		for {
			if _, err := stream.Recv(); err != nil {
				return
			}
		}
	}()
	return nil
}
