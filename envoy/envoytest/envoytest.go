// Package envoytest plays a whole Envoy in front of vgw for tests: the
// ext_proc client of extproc/extproctest, following the filter of a
// bootstrap file, and the ADS client of xds/xdstest under the bootstrap's
// node id, with a router between them that sends each request to an
// endpoint of the cluster ext_proc chose, as xDS told this Envoy.
package envoytest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/vgw-project/vgw/envoy"
	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/xds/xdstest"
)

// Envoy is an Envoy-role client of one vgw.
type Envoy struct {
	ExtProc *extproctest.Envoy
	// ADS is the xDS client: its stream, the config it keeps across
	// streams (see ReconnectADS) and what its workers route by.
	ADS *xdstest.Client
	// BeforeUpstream, when set before requests are sent, runs as each
	// request leaves for its endpoint; a test holds requests in flight
	// by blocking in it. An error fails the request as a connect failure.
	BeforeUpstream func(ctx context.Context, f *extproctest.Forwarded) error

	t    testing.TB
	node string
	xds  *grpc.ClientConn
}

// An Option changes how Start plays the Envoy.
type Option func(*extproctest.Filter)

// WithClock runs the Envoy's ext_proc message timer on c. By default it
// runs on a clock that stands still, so that no reply is ever late however
// slow the machine is (a test's outcome must not depend on that);
// clockwork.NewRealClock() gives Envoy's real 200 ms, for load tests that
// measure what a burst does.
func WithClock(c clockwork.Clock) Option { return func(f *extproctest.Filter) { f.Clock = c } }

// Filter is what the Envoy a bootstrap configures applies to the requests
// vgw routes: its ext_proc filter (extproctest.FilterFrom), the idle
// timer of the route vgw names clusters on (envoy.RouteOf), and around the
// filter the headers removed before it, the route table (each route's
// body limit, direct responses, routes that turn ext_proc off) and
// local_reply_config (see front). Its clock is the real one.
func Filter(b *bootstrapv3.Bootstrap) (extproctest.Filter, error) {
	ep, err := envoy.ExtProc(b)
	if err != nil {
		return extproctest.Filter{}, err
	}
	f := extproctest.FilterFrom(ep)
	if r, ok := envoy.RouteOf(b, "/v1/chat/completions"); ok {
		f.StreamIdleTimeout, f.BufferLimit = r.StreamIdleTimeout, int(r.BodyBufferLimit)
	}
	if err := front(&f, b); err != nil {
		return extproctest.Filter{}, err
	}
	return f, nil
}

// Start connects an Envoy configured by the bootstrap file to vgw's
// ext_proc and xDS addresses, and waits for its first xDS config. It is
// closed when the test ends.
func Start(t testing.TB, bootstrap, extprocAddr, xdsAddr string, opts ...Option) *Envoy {
	t.Helper()
	b, err := envoy.Load(bootstrap)
	if err != nil {
		t.Fatal(err)
	}
	f, err := Filter(b)
	if err != nil {
		t.Fatal(err)
	}
	dial := func(addr string) *grpc.ClientConn {
		// Envoy's gRPC client takes a message of any size
		// (grpc_service.proto max_receive_message_length: 0, unlimited), such
		// as a replaced 25 MiB upload; grpc-go's stops at 4 MiB.
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	// Run as docker-compose.yaml runs Envoy: with a filter that names the
	// Envoy by its hostname, its node id is the hostname (--service-node).
	node := b.GetNode().GetId()
	if f.Metadata[envoy.NodeMetadata] == envoy.HostnameNode {
		node, _ = os.Hostname()
	}
	e := &Envoy{t: t, node: node, xds: dial(xdsAddr)}
	e.ReconnectADS()
	f.Clock = clockwork.NewFakeClock()
	for _, o := range opts {
		o(&f)
	}
	e.ExtProc = extproctest.New(dial(extprocAddr), f, e.route)
	return e
}

// ReconnectADS starts the Envoy's xDS client, or, when it has one, breaks
// its stream and opens a new one under the same node id, as Envoy does
// when its xDS connection breaks: the Envoy keeps its config and asks
// again with the versions it has (xdstest.Client.Reconnect). It waits for
// the stream's first endpoints acknowledged.
func (e *Envoy) ReconnectADS() {
	e.t.Helper()
	// The ADS stream lasts as long as the test: not bound to the wait below.
	if e.ADS == nil {
		c, err := xdstest.Dial(context.Background(), e.xds, e.node)
		if err != nil {
			e.t.Fatal(err)
		}
		e.t.Cleanup(c.Close)
		e.ADS = c
	} else if err := e.ADS.Reconnect(context.Background(), e.xds); err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := e.ADS.Wait(ctx, func(c *xdstest.Client) bool { return c.StreamAcked(resource.EndpointType) != "" }); err != nil {
		e.t.Fatalf("the Envoy never got its xDS config on the new stream: %v", err)
	}
}

// Node is this Envoy's node id on xDS.
func (e *Envoy) Node() string { return e.node }

// Router is this Envoy's router, for a second ext_proc client that plays
// another filter in front of the same upstreams.
func (e *Envoy) Router() extproctest.Upstream { return e.route }

// route is Envoy's router: the request (its path, content type and body)
// goes to the host a worker's load balancer picks in its cluster (xdstest.Client.Route: what the main
// thread has posted to the workers, healthy hosts first, every host when
// too few are healthy), or fails as Envoy's would: NC for a cluster the
// workers do not have (unknown, or new and still warming), UH for one with
// no host (router.cc).
func (e *Envoy) route(ctx context.Context, f *extproctest.Forwarded) (*extproctest.Response, error) {
	addr, err := e.ADS.Route(f.Cluster)
	switch {
	case errors.Is(err, xdstest.ErrClusterNotFound):
		return &extproctest.Response{Status: http.StatusServiceUnavailable, Body: []byte("cluster not found")}, nil // NC
	case err != nil:
		return nil, io.ErrUnexpectedEOF // UH: no healthy upstream
	}
	if e.BeforeUpstream != nil {
		if err := e.BeforeUpstream(ctx, f); err != nil {
			return nil, err
		}
	}
	path, contentType := f.Get(":path"), f.Get("content-type")
	if path == "" {
		path = "/v1/chat/completions"
	}
	if contentType == "" {
		contentType = "application/json"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+path, bytes.NewReader(f.Body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", contentType)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	out := &extproctest.Response{Status: resp.StatusCode, Body: body,
		Headers: []extproctest.Header{{Key: "content-type", Value: resp.Header.Get("Content-Type")}}}
	if err != nil {
		// The server went away mid-body (a crash): the client has had the
		// headers and part of the body; Envoy resets the stream.
		ended := make(chan []byte)
		close(ended)
		readErr := fmt.Errorf("read %s's answer: %w", addr, err)
		out.Stream, out.StreamErr = ended, func() error { return readErr }
	}
	return out, nil
}

// Ask sends a chat request for model, as a client would to Envoy.
func (e *Envoy) Ask(ctx context.Context, model string, stream bool) (*extproctest.Result, error) {
	body := fmt.Sprintf(`{"model":%q,"messages":[{"role":"user","content":"hi"}],"max_tokens":4,"stream":%t}`, model, stream)
	return e.ExtProc.Do(ctx, extproctest.Request{Body: []byte(body)})
}
