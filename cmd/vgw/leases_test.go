package main

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/manager/gpu"
	"github.com/vgw-project/vgw/manager/runtime"
	"github.com/vgw-project/vgw/xds"
	"github.com/vgw-project/vgw/xds/xdstest"
)

var sink extproc.Lease

// TestLeaseHandOverAllocs: handing a manager's lease to extproc, as an
// extproc.Lease, allocates nothing: lease is one pointer wide, so the
// interface holds it directly.
func TestLeaseHandOverAllocs(t *testing.T) {
	var l manager.Lease
	if n := testing.AllocsPerRun(100, func() { sink = lease{l} }); n != 0 {
		t.Fatalf("%v allocs per lease handed over, want 0", n)
	}
}

// stubRuntime's servers are httptest servers that answer /health 200.
// stubRuntime starts servers that answer every request 200 at once.
type stubRuntime struct {
	t     *testing.T
	mu    sync.Mutex
	n     int
	exits chan runtime.Exit
}

func (r *stubRuntime) Start(ctx context.Context, spec runtime.Spec) (*runtime.Instance, error) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	r.t.Cleanup(srv.Close)
	r.mu.Lock()
	r.n++
	r.mu.Unlock()
	return &runtime.Instance{ID: spec.Model, Model: spec.Model, Addr: strings.TrimPrefix(srv.URL, "http://"),
		Signature: spec.Signature, Launch: spec.Launch}, nil
}
func (r *stubRuntime) Stop(context.Context, *runtime.Instance, time.Duration) error { return nil }
func (r *stubRuntime) Exits() <-chan runtime.Exit                                   { return r.exits }
func (r *stubRuntime) Adopt(context.Context) ([]*runtime.Instance, error)           { return nil, nil }
func (r *stubRuntime) PIDs(context.Context, *runtime.Instance) ([]int, error)       { return nil, nil }

const leaseCfg = `
runtime: {kind: sim}
load_timeout: 1m
drain_timeout: 1m
gpus: [{name: sim0, memory: 80GiB}]
`

// TestAttackLeaseOfRemovedModel: a request got its manager lease on a and
// waits for its Envoy to take a's endpoint; meanwhile a config reload
// removes a. xDS drops a's cluster, but the addr func that cmd hands to
// WaitAcked checks only the Endpoint, which a (removed, still ready, as
// the request holds it) keeps: the request waits for its whole deadline
// for a cluster that no longer exists, holding the removed model's server
// up all the while, and is answered 504 rather than at once.
// TestLeaseOfRemovedModel: a request waiting for its Envoy to learn where
// a model runs is answered at once when the model leaves the config,
// rather than held to its deadline; one whose model stays is admitted.
func TestLeaseOfRemovedModel(t *testing.T) {
	t.Run("kept (control)", func(t *testing.T) { leaseThenReload(t, false) })
	t.Run("removed", func(t *testing.T) { leaseThenReload(t, true) })
}

func leaseThenReload(t *testing.T, remove bool) {
	parse := func(y string) *config.Config {
		cfg, err := config.Parse("t.yaml", []byte(y))
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	cfg := parse(leaseCfg + "models:\n  a: {vram: 20GiB}\n  b: {vram: 20GiB}\n")
	mgr := manager.New(cfg, &stubRuntime{t: t, exits: make(chan runtime.Exit)},
		gpu.NewDeclared([]gpu.GPU{{Name: "sim0", Total: 80 << 30}}), manager.Options{Tick: 10 * time.Millisecond, GPUPoll: 10 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go mgr.Run(ctx)
	xs := xds.New(mgr, xds.Options{Settings: xds.DefaultSettings, Log: slog.New(slog.DiscardHandler)})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	xs.Register(g)
	go g.Serve(lis)
	defer g.Stop()
	go xs.Run(ctx)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	env, err := xdstest.Dial(ctx, conn, "e1")
	if err != nil {
		t.Fatal(err)
	}
	defer env.Close()
	wctx, wcancel := context.WithTimeout(ctx, time.Minute)
	defer wcancel()
	if err := env.Wait(wctx, func(c *xdstest.Client) bool { return c.Acked(resource.EndpointType) != "" }); err != nil {
		t.Fatal(err)
	}
	env.Hold(resource.EndpointType) // a slow Envoy: the request waits in WaitAcked

	ls := leases{mgr: mgr, xds: xs}
	const deadline = 10 * time.Second
	type res struct {
		err  error
		took time.Duration
	}
	done := make(chan res, 1)
	go func() {
		lctx, c := context.WithTimeout(ctx, deadline)
		defer c()
		began := time.Now()
		l, err := ls.Lease(lctx, "e1", "a")
		if l != nil {
			l.Release(extproc.Result{})
		}
		done <- res{err, time.Since(began)}
	}()
	for v := mgr.View(); v.Model("a").State != manager.Ready || v.Model("a").InFlight() != 1; v = mgr.View() {
		<-v.Changed()
	}
	if remove {
		if err := mgr.Update(parse(leaseCfg + "models:\n  b: {vram: 20GiB}\n")); err != nil {
			t.Fatal(err)
		}
	}
	// The Envoy catches up: it takes every version since, the last
	// without a's cluster. Nothing is left to wait for.
	env.Release(resource.EndpointType)
	r := <-done
	t.Logf("Lease answered after %v: %v", r.took.Round(time.Millisecond), r.err)
	if errors.Is(r.err, context.DeadlineExceeded) || r.took > deadline/2 {
		t.Errorf("a request for a model removed while it waited for its Envoy waited its whole deadline (%v): %v", r.took.Round(time.Millisecond), r.err)
	}
}
