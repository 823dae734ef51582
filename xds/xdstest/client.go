// Package xdstest plays an Envoy's xDS client against an ADS server, over
// real gRPC, for tests and benchmarks on machines without Envoy. It plays
// Envoy 1.39 (read at commit 6806efb, 1.39.0-dev); each behaviour cites the
// Envoy source it follows.
//
// A Client has two parts, as Envoy has. Its main thread speaks ADS (state
// of the world) and runs the cluster manager: a wildcard CDS request, then
// for the clusters it got an EDS request naming them, acknowledging each
// response with its version and nonce or rejecting it with an error
// detail (grpc_mux_impl.cc). A new or changed cluster warms until its EDS
// (and, with active health checks, the first check of each host) has come,
// or its initial_fetch_timeout has run out; after startup, CDS stays
// paused while any cluster warms, so the CDS ACK goes out only once every
// cluster is warm (cluster_manager_impl.cc). Its workers are what a
// router sees: the clusters and hosts the main thread has posted to them
// (cluster_manager_impl.cc postThreadLocalClusterUpdate). Endpoints,
// Cluster, Hosts and Route read the workers' view; MainEndpoints and
// MainHosts the main thread's.
//
// Timers (initial_fetch_timeout, health check intervals and timeouts,
// update_merge_window) run on a clock a test can supply (WithClock).
package xdstest

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/jonboulle/clockwork"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
)

// Client is one Envoy's xDS client and cluster manager.
type Client struct {
	node  string
	clock clockwork.Clock
	http  *http.Client // the active health checks'

	events chan func() // work for the main thread; see loop
	quit   chan struct{}
	done   chan struct{} // closed when the main thread has ended
	close  sync.Once
	wg     sync.WaitGroup // stream readers and health checks under way

	// The lock guards everything below. The main thread holds it while it
	// handles an event, never while it sends; readers take it briefly.
	mu     sync.Mutex
	stream *adsStream // nil before Dial's stream and after a failure
	gen    int        // counts streams, to drop what an old one delivers
	fresh  bool       // the stream is not yet established: nothing is sent
	out    []*discoverygrpc.DiscoveryRequest

	api   map[string]*apiState // type URL → subscription
	subs  []string             // type URLs in the order first subscribed
	acked map[string]string    // type URL → version last acknowledged
	// streamAcked is acked, on the current stream only.
	streamAcked map[string]string

	reject map[string]string                           // type URL → error detail for the next response
	hold   map[string]bool                             // type URL → responses held unapplied; see Hold
	held   map[string]*discoverygrpc.DiscoveryResponse // the last response held, per type URL

	clusterManager

	changed chan struct{} // closed and replaced after every event
	err     error
}

// apiState is one subscription's request state, resent whole each time
// (grpc_mux_impl.h ApiState: request_, pauses_, pending_).
type apiState struct {
	version string         // the last version accepted
	nonce   string         // the last nonce received on this stream
	detail  *status.Status // why the last response was rejected, until sent
	paused  bool           // CDS while clusters warm; see updateClusterCounts
	pending bool           // a request was queued while paused
}

// adsStream is one ADS stream and how to end it.
type adsStream struct {
	discoverygrpc.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	cancel context.CancelFunc
}

// An Option sets up a Client before its stream starts.
type Option func(*Client)

// Holding makes the client hold the responses of typeURL from the start
// (see Hold).
func Holding(typeURL string) Option { return func(c *Client) { c.hold[typeURL] = true } }

// WithClock runs the client's timers on clock: initial_fetch_timeout, the
// active health checks' intervals and timeouts, and update_merge_window.
// By default they run on the real clock, as Envoy's do.
func WithClock(clock clockwork.Clock) Option { return func(c *Client) { c.clock = clock } }

// Dial opens an ADS stream on conn as Envoy node id and subscribes to the
// clusters. The client lasts until Close, across streams (see Reconnect);
// the stream until ctx ends.
func Dial(ctx context.Context, conn grpc.ClientConnInterface, node string, opts ...Option) (*Client, error) {
	c := &Client{
		node:  node,
		clock: clockwork.NewRealClock(),
		http: &http.Client{
			// Envoy keeps a check's connection for the next one
			// (reuse_connection); here each check connects anew, so
			// nothing is left open between checks for a leak check to
			// find. A redirect is an answer like any other: not followed.
			Transport:     &http.Transport{DisableKeepAlives: true},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		events:      make(chan func(), 64),
		quit:        make(chan struct{}),
		done:        make(chan struct{}),
		api:         map[string]*apiState{},
		acked:       map[string]string{},
		streamAcked: map[string]string{},
		reject:      map[string]string{},
		hold:        map[string]bool{},
		held:        map[string]*discoverygrpc.DiscoveryResponse{},
		changed:     make(chan struct{}),
	}
	c.clusterManager.init()
	for _, o := range opts {
		o(c)
	}
	// Envoy subscribes to the clusters at startup and to their endpoints
	// once it has clusters (cds_api_impl.cc; grpc_mux_impl.cc addWatch).
	c.subscribe(resource.ClusterType)
	stream, err := c.open(ctx, conn)
	if err != nil {
		return nil, err
	}
	go c.loop()
	c.attach(stream, false)
	return c, nil
}

// Reconnect replaces the client's ADS stream with a new one on conn, as
// Envoy does when its xDS stream breaks: it keeps the config it has, and on
// the new stream asks again for each subscription, CDS first, with the
// last version it accepted, no nonce and the resources it wants
// (grpc_mux_impl.cc onStreamEstablished, clearNonce). While clusters warm
// CDS stays paused, so EDS is asked for first and CDS once they are warm.
//
// Hold ends: what it held came on the old stream. A Reject still pending
// applies to the next response, on the new stream.
func (c *Client) Reconnect(ctx context.Context, conn grpc.ClientConnInterface) error {
	select {
	case <-c.quit:
		return errors.New("xdstest: the client is closed")
	default:
	}
	stream, err := c.open(ctx, conn)
	if err != nil {
		return err
	}
	c.attach(stream, true)
	return nil
}

func (c *Client) open(ctx context.Context, conn grpc.ClientConnInterface) (*adsStream, error) {
	ctx, cancel := context.WithCancel(ctx)
	s, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		cancel()
		return nil, err
	}
	return &adsStream{s, cancel}, nil
}

// attach makes stream the client's, ending the one before, and has the
// main thread resend the subscriptions on it once it is established. A
// reconnect ends Hold.
func (c *Client) attach(stream *adsStream, reconnect bool) {
	c.mu.Lock()
	if reconnect {
		clear(c.hold)
		clear(c.held)
	}
	old := c.stream
	c.gen++
	gen := c.gen
	c.stream = stream
	c.err = nil
	clear(c.streamAcked)
	// Nothing goes on the new stream before established resends every
	// subscription (grpc_mux_impl.cc onStreamEstablished replaces the
	// request queue): an event handled in between sends nothing.
	c.fresh = true
	c.mu.Unlock()
	if old != nil {
		old.cancel()
	}
	c.wg.Add(1)
	go c.read(gen, stream)
	c.post(func() { c.established(gen) })
}

// established resends each subscription on a new stream
// (grpc_mux_impl.cc onStreamEstablished).
func (c *Client) established(gen int) {
	if gen != c.gen {
		return
	}
	c.fresh = false
	for _, api := range c.api {
		api.nonce = "" // clearNonce
	}
	for _, typeURL := range c.subs {
		c.queue(typeURL)
	}
}

// read delivers what stream receives to the main thread.
func (c *Client) read(gen int, stream *adsStream) {
	defer c.wg.Done()
	for {
		resp, err := stream.Recv()
		if err != nil {
			c.post(func() { c.broken(gen, err) })
			return
		}
		c.post(func() { c.received(gen, resp) })
	}
}

// broken records why the stream ended. Envoy keeps its config and
// reconnects; here a test calls Reconnect.
func (c *Client) broken(gen int, err error) {
	if gen != c.gen || c.stream == nil {
		return
	}
	c.stream.cancel()
	c.stream = nil
	if !errors.Is(err, context.Canceled) && c.err == nil {
		c.err = err
	}
}

// Close ends the stream and the client, as an Envoy shutting down.
func (c *Client) Close() {
	c.close.Do(func() { close(c.quit) })
	<-c.done
	c.mu.Lock()
	stream := c.stream
	c.stream = nil
	c.mu.Unlock()
	if stream != nil {
		stream.cancel()
	}
	c.wg.Wait()
	c.http.CloseIdleConnections()
}

// post hands f to the main thread; it is dropped once the client is
// closed.
func (c *Client) post(f func()) {
	select {
	case c.events <- f:
	case <-c.quit:
	}
}

// after runs f on the main thread once d has passed on the client's clock.
func (c *Client) after(d time.Duration, f func()) clockwork.Timer {
	return c.clock.AfterFunc(d, func() { c.post(f) })
}

// loop is Envoy's main thread: it handles one event at a time, under the
// lock, then sends the requests the event queued, in order, with the lock
// released. So whatever an event posts to the workers is there before the
// request that acknowledges it is written (cluster_manager_impl.cc posts
// during onConfigUpdate; grpc_mux_impl.cc sends the ACK after it).
func (c *Client) loop() {
	defer close(c.done)
	for {
		select {
		case f := <-c.events:
			c.mu.Lock()
			f()
			out, stream, gen := c.out, c.stream, c.gen
			c.out = nil
			c.mu.Unlock()
			var sent []*discoverygrpc.DiscoveryRequest
			var err error
			for _, r := range out {
				if err = stream.Send(r); err != nil {
					break
				}
				sent = append(sent, r)
			}
			c.mu.Lock()
			for _, r := range sent {
				if r.GetResponseNonce() != "" && r.GetErrorDetail() == nil {
					c.acked[r.GetTypeUrl()] = r.GetVersionInfo()
					if gen == c.gen {
						c.streamAcked[r.GetTypeUrl()] = r.GetVersionInfo()
					}
				}
			}
			if err != nil {
				c.broken(gen, err)
			}
			c.signalLocked()
			c.mu.Unlock()
		case <-c.quit:
			c.mu.Lock()
			c.stopAll()
			c.signalLocked()
			c.mu.Unlock()
			return
		}
	}
}

// subscribe starts asking for typeURL (grpc_mux_impl.cc addWatch: the
// first watch of a type subscribes it, for good).
func (c *Client) subscribe(typeURL string) {
	if c.api[typeURL] == nil {
		c.api[typeURL] = &apiState{}
		c.subs = append(c.subs, typeURL)
	}
}

// queue sends typeURL's request, or marks it pending while the type is
// paused; with no stream it is dropped, as the reconnect resends it
// (grpc_mux_impl.cc queueDiscoveryRequest, sendDiscoveryRequest).
func (c *Client) queue(typeURL string) {
	api := c.api[typeURL]
	if c.stream == nil || c.fresh {
		return
	}
	if api.paused {
		api.pending = true
		return
	}
	var names []string
	if typeURL == resource.EndpointType {
		names = c.edsNames()
	}
	c.out = append(c.out, &discoverygrpc.DiscoveryRequest{
		Node: &corev3.Node{Id: c.node, Cluster: "vgw"}, TypeUrl: typeURL,
		VersionInfo: api.version, ResponseNonce: api.nonce, ResourceNames: names, ErrorDetail: api.detail,
	})
	api.detail = nil // sent once (grpc_mux_impl.cc sendDiscoveryRequest)
}

// received takes a response off the stream, or holds it (see Hold).
func (c *Client) received(gen int, resp *discoverygrpc.DiscoveryResponse) {
	if gen != c.gen {
		return
	}
	if c.hold[resp.GetTypeUrl()] {
		c.held[resp.GetTypeUrl()] = resp
		return
	}
	c.process(resp)
}

// process applies a response and answers it (grpc_mux_impl.cc
// onDiscoveryResponse): the version is accepted and acknowledged, or, if
// applying it failed, the old version is kept and the error sent with the
// response's nonce.
func (c *Client) process(resp *discoverygrpc.DiscoveryResponse) {
	typeURL := resp.GetTypeUrl()
	api := c.api[typeURL]
	if api == nil {
		return // no subscriber: ignored, unanswered
	}
	if typeURL == resource.EndpointType && len(c.edsNames()) == 0 {
		// No cluster wants endpoints: an empty response is taken as is,
		// anything else rejected by keeping the version.
		api.nonce = resp.GetNonce()
		if len(resp.GetResources()) == 0 {
			api.version = resp.GetVersionInfo()
		} else {
			c.queue(typeURL)
		}
		return
	}
	var err error
	if detail, ok := c.reject[typeURL]; ok {
		delete(c.reject, typeURL)
		err = errors.New(detail)
	} else {
		switch typeURL {
		case resource.ClusterType:
			err = c.applyClusters(resp)
		case resource.EndpointType:
			err = c.applyEndpoints(resp)
		}
	}
	if err != nil {
		switch typeURL {
		case resource.ClusterType:
			// Startup goes on without the clusters (cds_api_impl.cc
			// onConfigUpdateFailed: runInitializeCallbackIfAny).
			c.cdsApplied = true
			c.checkInitialized()
		case resource.EndpointType:
			c.endpointsRejected()
		}
		api.detail = &status.Status{Code: int32(codes.Internal), Message: err.Error()}
	} else {
		api.version = resp.GetVersionInfo()
	}
	api.nonce = resp.GetNonce()
	c.queue(typeURL)
}

// applyClusters decodes a CDS response and hands it to the cluster
// manager. A resource that does not decode or validate rejects the whole
// response, nothing applied (decoded_resource_impl.h, at decode time).
func (c *Client) applyClusters(resp *discoverygrpc.DiscoveryResponse) error {
	var clusters []*clusterv3.Cluster
	for _, a := range resp.GetResources() {
		cl := &clusterv3.Cluster{}
		if err := a.UnmarshalTo(cl); err != nil {
			return fmt.Errorf("decode cluster: %w", err)
		}
		if err := cl.ValidateAll(); err != nil {
			return fmt.Errorf("cluster %s is invalid: %w", cl.GetName(), err)
		}
		clusters = append(clusters, cl)
	}
	c.onClusters(clusters)
	return nil
}

// applyEndpoints decodes an EDS response and hands it to the cluster
// manager, as applyClusters.
func (c *Client) applyEndpoints(resp *discoverygrpc.DiscoveryResponse) error {
	las := map[string]*endpointv3.ClusterLoadAssignment{}
	for _, a := range resp.GetResources() {
		la := &endpointv3.ClusterLoadAssignment{}
		if err := a.UnmarshalTo(la); err != nil {
			return fmt.Errorf("decode load assignment: %w", err)
		}
		if err := la.ValidateAll(); err != nil {
			return fmt.Errorf("load assignment %s is invalid: %w", la.GetClusterName(), err)
		}
		if las[la.GetClusterName()] != nil {
			// The first of each name is taken (grpc_mux_impl.cc
			// processDiscoveryResources keys them by name), so each
			// cluster's watch sees one.
			continue
		}
		las[la.GetClusterName()] = la
	}
	c.onEndpoints(las)
	return nil
}

// Reject makes the client reject the next response of typeURL with detail,
// as Envoy rejects one it cannot apply.
func (c *Client) Reject(typeURL, detail string) {
	c.mu.Lock()
	c.reject[typeURL] = detail
	c.mu.Unlock()
}

// Hold makes the client leave the responses of typeURL it gets from now
// on unapplied and unanswered, as an Envoy that is slow to take up a
// config (its main thread busy) does, until Release or Reconnect.
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
	c.post(func() {
		if resp := c.held[typeURL]; resp != nil {
			delete(c.held, typeURL)
			c.process(resp)
		}
	})
}

func (c *Client) signalLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// Acked returns the version last acknowledged for typeURL, on any stream.
func (c *Client) Acked(typeURL string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.acked[typeURL]
}

// StreamAcked returns the version acknowledged for typeURL on the current
// stream: "" until the stream has had a response of the type and
// acknowledged it.
func (c *Client) StreamAcked(typeURL string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.streamAcked[typeURL]
}

// Err returns why the stream broke, if it did.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Wait returns once cond holds (checked after every event the client
// handles: a response, a timer, a health check) or ctx ends, or the
// stream breaks.
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
		case <-c.done:
			if cond(c) {
				return nil
			}
			return errors.New("xdstest: the client is closed")
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

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
