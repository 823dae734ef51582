package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/xds"
)

// app is a running vgw: the GPU manager, the xDS server and the ext_proc
// service, wired as the architecture says and serving on their listeners.
// vgw serve runs one; tests run one on loopback ports.
type app struct {
	cfg    *config.Config
	log    *slog.Logger
	mgr    *manager.Manager
	routes *routes
	xds    *xds.Server
	ep     *extproc.Server
	health *health.Server

	extprocGRPC, xdsGRPC *grpc.Server
	extprocAddr, xdsAddr net.Addr
	serveErr             chan error

	closeGPUs func()
	stop      context.CancelFunc // ends the manager's loop and the xDS publisher
	done      chan struct{}      // closed when the manager's loop has ended
}

// startApp builds vgw for cfg and starts serving. onEvent, when set, also
// hears the manager's lifecycle events.
func startApp(cfg *config.Config, log *slog.Logger, onEvent func(manager.Event)) (*app, error) {
	a := &app{cfg: cfg, log: log, serveErr: make(chan error, 2), done: make(chan struct{})}
	// The xDS server hears of every lifecycle event of the manager; the
	// manager exists before the server, so the hook looks it up.
	var xs atomic.Pointer[xds.Server]
	mgr, closeGPUs, err := newManager(cfg, log, func(e manager.Event) {
		if x := xs.Load(); x != nil {
			x.Notify()
		}
		if onEvent != nil {
			onEvent(e)
		}
	})
	if err != nil {
		return nil, err
	}
	a.mgr, a.closeGPUs = mgr, closeGPUs
	a.routes = newRoutes(mgr, cfg)
	a.xds = xds.New(a.routes, xds.Settings{
		ConnectTimeout:      xds.DefaultSettings.ConnectTimeout,
		HealthCheckInterval: cfg.Envoy.HealthCheckInterval.Std(),
		NoEnvoyGrace:        cfg.Envoy.XDSGrace.Std(),
	}, log)
	xs.Store(a.xds)
	a.routes.xds = a.xds
	a.ep = extproc.New(extprocModels(cfg), a.routes,
		extproc.WithLogger(log),
		extproc.WithMaxBody(int(cfg.MaxBodyBytes)),
		extproc.WithLoadTimeout(cfg.LoadTimeout.Std()),
		extproc.WithMessageTimeouts(cfg.Envoy.MessageTimeout.Std(), cfg.Envoy.MaxMessageTimeout.Std()),
	)

	xdsLis, err := net.Listen("tcp", cfg.Listen.XDS)
	if err != nil {
		closeGPUs()
		return nil, fmt.Errorf("xDS listener: %w", err)
	}
	extprocLis, err := net.Listen("tcp", cfg.Listen.ExtProc)
	if err != nil {
		xdsLis.Close()
		closeGPUs()
		return nil, fmt.Errorf("ext_proc listener: %w", err)
	}
	a.xdsAddr, a.extprocAddr = xdsLis.Addr(), extprocLis.Addr()

	ctx, stop := context.WithCancel(context.Background())
	a.stop = stop
	go func() { mgr.Run(ctx); close(a.done) }()
	go a.xds.Run(ctx)

	// ADS streams last as long as Envoy runs: keepalives find dead peers.
	a.xdsGRPC = grpc.NewServer(
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 10 * time.Second, Timeout: 5 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.MaxConcurrentStreams(1<<20),
	)
	a.xds.Register(a.xdsGRPC)
	healthpb.RegisterHealthServer(a.xdsGRPC, health.NewServer())
	a.extprocGRPC = grpc.NewServer(extproc.GRPCOptions(int(cfg.MaxBodyBytes))...)
	a.ep.Register(a.extprocGRPC)
	a.health = health.NewServer()
	healthpb.RegisterHealthServer(a.extprocGRPC, a.health)
	go func() { a.serveErr <- a.xdsGRPC.Serve(xdsLis) }()
	go func() { a.serveErr <- a.extprocGRPC.Serve(extprocLis) }()
	return a, nil
}

// reconfigure applies a reloaded config to every part.
func (a *app) reconfigure(cfg *config.Config) {
	a.routes.set(cfg)
	a.mgr.Update(cfg)
	a.ep.SetModels(extprocModels(cfg))
	a.xds.Notify()
	a.cfg = cfg
}

// shutdown answers new requests 503, lets those in flight finish for up to
// shutdown_timeout, and stops. Fake sim servers are stopped too, as no
// next vgw can adopt them; Docker's are left running for the next to adopt.
func (a *app) shutdown() {
	grace := a.cfg.ShutdownTimeout.Std()
	a.log.Info("shutting down", slog.Duration("grace", grace))
	a.ep.SetDraining(true)
	a.health.Shutdown()
	done := make(chan struct{})
	go func() { a.extprocGRPC.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		a.extprocGRPC.Stop()
	}
	if a.cfg.Runtime.Kind == "sim" {
		stop, cancel := context.WithTimeout(context.Background(), grace)
		a.mgr.StopAll(stop)
		cancel()
	}
	// Stop, not GracefulStop: ADS streams never end by themselves.
	a.xdsGRPC.Stop()
	a.stop()
	<-a.done
	a.closeGPUs()
}

// extprocModels lists the configured models with their resolved limits.
func extprocModels(cfg *config.Config) []extproc.Model {
	var ms []extproc.Model
	for _, name := range cfg.ModelNames() {
		l := cfg.LimitsOf(name)
		ms = append(ms, extproc.Model{Name: name, Limits: extproc.Limits{
			MaxConcurrent: l.MaxConcurrent, MaxQueue: l.MaxQueue, QueueTimeout: l.QueueTimeout,
		}})
	}
	return ms
}
