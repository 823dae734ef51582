package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/vgw-project/vgw/admin"
	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/internal/secrets"
	"github.com/vgw-project/vgw/manager"
	adminv1 "github.com/vgw-project/vgw/proto/adminv1"
	"github.com/vgw-project/vgw/xds"
)

// app is a running vgw: the GPU manager, the xDS server and the ext_proc
// service, wired as the architecture says and serving on their listeners.
// vgw serve runs one; tests run one on loopback ports.
type app struct {
	cfgMu  sync.Mutex
	cfg    *config.Config // guarded by cfgMu after start
	log    *slog.Logger
	level  *slog.LevelVar
	mgr    *manager.Manager
	xds    *xds.Server
	ep     *extproc.Server
	health *health.Server

	extprocGRPC, xdsGRPC, adminGRPC *grpc.Server
	extprocAddr, xdsAddr, adminAddr net.Addr
	httpAddr                        net.Addr
	http                            *http.Server
	caps                            connCaps // connections each listener may hold
	serveErr                        chan error

	events      *admin.Hub
	metrics     *admin.Metrics
	ready       atomic.Bool
	stopping    atomic.Bool
	adminHealth *health.Server
	redactor    *secrets.Redactor
	adminToken  string

	closeGPUs func()
	stop      context.CancelFunc // ends the manager's loop and the xDS publisher
	done      chan struct{}      // closed when the manager's loop has ended
}

// appOptions are the settings of an app that do not come from the config.
type appOptions struct {
	// level is the live log level, which the admin service changes.
	level *slog.LevelVar
	// onEvent, when set, also hears the manager's lifecycle events.
	onEvent func(manager.Event)
	// adminToken, when set, guards the admin RPCs and /status.
	adminToken string
	// adminTLS, when set, serves the admin service over TLS.
	adminTLS *tls.Config
	// redactor, when set, is the one the log handler uses; startApp keeps
	// it knowing the config's secrets and the admin token.
	redactor *secrets.Redactor
}

// startApp builds vgw for cfg and starts serving.
func startApp(cfg *config.Config, log *slog.Logger, o appOptions) (*app, error) {
	if o.level == nil {
		o.level = new(slog.LevelVar)
		o.level.Set(cfg.SlogLevel())
	}
	if o.redactor == nil {
		o.redactor = new(secrets.Redactor)
	}
	a := &app{cfg: cfg, log: log, level: o.level, serveErr: make(chan error, 4), done: make(chan struct{}),
		events: admin.NewHub(), metrics: admin.NewMetrics(), redactor: o.redactor, adminToken: o.adminToken}
	a.setSecrets(cfg)
	a.metrics.Models(cfg.ModelNames())
	// The event watchers and the metrics hear of every lifecycle event of
	// the manager. The xDS server follows the manager's Views.
	mgr, closeGPUs, err := newManager(cfg, log, func(e manager.Event) {
		a.events.Publish(admin.Event{Time: e.Time, Kind: e.Kind, Model: e.Model, Detail: e.Detail})
		a.metrics.Event(e.Model, e.Kind, e.Took)
		if o.onEvent != nil {
			o.onEvent(e)
		}
	})
	if err != nil {
		return nil, err
	}
	a.mgr, a.closeGPUs = mgr, closeGPUs
	a.xds = xds.New(mgr, xds.Options{
		Settings: xds.Settings{
			ConnectTimeout:      xds.DefaultSettings.ConnectTimeout,
			HealthCheckInterval: cfg.Envoy.HealthCheckInterval.Std(),
			NoEnvoyGrace:        cfg.Envoy.XDSGrace.Std(),
			AckTimeout:          cfg.Envoy.XDSAckTimeout.Std(),
		},
		Log: log,
		OnNACK: func(n xds.NACK) {
			a.events.Publish(admin.Event{Time: n.Time, Kind: "xds_nack",
				Detail: "Envoy " + n.Node + " rejected " + n.TypeURL + " version " + n.Version + ": " + n.Error})
		},
	})
	a.ep = extproc.New(extprocModels(cfg), leases{mgr, a.xds}, extproc.Options{
		Log:               log,
		MaxBody:           int(cfg.MaxBodyBytes),
		MaxAudioBody:      int(cfg.MaxAudioBodyBytes),
		LoadTimeout:       cfg.LoadTimeout.Std(),
		MessageTimeout:    cfg.Envoy.MessageTimeout.Std(),
		MaxMessageTimeout: cfg.Envoy.MaxMessageTimeout.Std(),
		StreamIdleTimeout: streamIdleBound(cfg.Envoy.StreamIdleTimeout.Std()),
		OnWait:            a.metrics.QueueWait,
		Redact:            a.redactor.Redact,
		TrustModelHeader:  cfg.TrustModelHeader,
		State:             modelState(mgr),
		Fairness:          fairnessOf(cfg),
	})
	svc := admin.NewService(admin.Options{
		Manager: mgr, Admission: a.ep, Envoys: a.xds, Level: o.level,
		Config: a.currentConfig, Events: a.events, Metrics: a.metrics, Log: log, Version: version, Started: time.Now(),
		Redact: a.redactor.Redact, Stopping: a.stopping.Load,
	})

	lis, err := listenAll(map[string]string{"xDS": cfg.Listen.XDS, "ext_proc": cfg.Listen.ExtProc, "admin": cfg.Listen.Admin, "HTTP": cfg.Listen.HTTP})
	if err != nil {
		closeGPUs()
		return nil, err
	}
	a.caps = capsFor(openFilesLimit())
	limitAll(lis, a.caps)
	xdsLis, extprocLis, adminLis, httpLis := lis["xDS"], lis["ext_proc"], lis["admin"], lis["HTTP"]
	a.xdsAddr, a.extprocAddr, a.adminAddr, a.httpAddr = xdsLis.Addr(), extprocLis.Addr(), adminLis.Addr(), httpLis.Addr()

	ctx, stop := context.WithCancel(context.Background())
	a.stop = stop
	go func() { mgr.Run(ctx); close(a.done) }()
	go a.xds.Run(ctx)

	// ADS streams last as long as Envoy runs: keepalives find dead peers.
	// A connection with no stream (not an Envoy's) is closed after a
	// minute, one that has not finished its handshake after 10 s.
	a.xdsGRPC = grpc.NewServer(
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 10 * time.Second, Timeout: 5 * time.Second, MaxConnectionIdle: time.Minute}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.MaxConcurrentStreams(1<<20),
		grpc.ConnectionTimeout(10*time.Second),
	)
	a.xds.Register(a.xdsGRPC)
	healthpb.RegisterHealthServer(a.xdsGRPC, health.NewServer())
	a.extprocGRPC = grpc.NewServer(a.ep.ServerOptions()...)
	a.ep.Register(a.extprocGRPC)
	a.health = health.NewServer()
	healthpb.RegisterHealthServer(a.extprocGRPC, a.health)

	// The admin service: the token (if any) on every Admin RPC, not on
	// health or reflection, so probes and `grpcurl list` work without it.
	// grpcurl opens a connection per call; one left with no call (and no
	// WatchEvents) is closed after a minute, and pings find a watcher
	// that went away without closing.
	adminOpts := []grpc.ServerOption{
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: time.Minute, Timeout: 20 * time.Second, MaxConnectionIdle: time.Minute}),
		grpc.ConnectionTimeout(10 * time.Second),
	}
	if o.adminToken != "" {
		adminOpts = append(adminOpts, admin.TokenAuth(o.adminToken)...)
	}
	if o.adminTLS != nil {
		adminOpts = append(adminOpts, grpc.Creds(credentials.NewTLS(o.adminTLS)))
	}
	a.adminGRPC = grpc.NewServer(adminOpts...)
	adminv1.RegisterAdminServer(a.adminGRPC, svc)
	a.adminHealth = health.NewServer()
	healthpb.RegisterHealthServer(a.adminGRPC, a.adminHealth)
	reflection.Register(a.adminGRPC)
	go svc.WatchRejections(ctx, time.Second)

	// Every page is small and quick: a client that takes longer than
	// these to send its request or read the answer, or keeps an idle
	// connection, is let go.
	a.http = &http.Server{
		Handler:           admin.Handler(svc, a.metrics, admin.HTTPOptions{Token: o.adminToken, Ready: a.readiness}),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      60 * time.Second,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    64 << 10,
	}
	go func() { a.serveErr <- a.xdsGRPC.Serve(xdsLis) }()
	go func() { a.serveErr <- a.extprocGRPC.Serve(extprocLis) }()
	go func() { a.serveErr <- a.adminGRPC.Serve(adminLis) }()
	go func() {
		if err := a.http.Serve(httpLis); !errors.Is(err, http.ErrServerClosed) {
			a.serveErr <- err
		}
	}()
	a.ready.Store(true)
	return a, nil
}

// readiness says why vgw is not ready for requests, or nil: /readyz
// answers 503 while it drains, so that what balances across vgw boxes
// sends elsewhere during maintenance.
func (a *app) readiness() error {
	switch {
	case !a.ready.Load():
		return errors.New("starting or shutting down")
	case a.ep.Draining():
		return errors.New("draining (see the admin Drain RPC)")
	}
	return nil
}

// listenAll opens every listener, or none.
func listenAll(addrs map[string]string) (map[string]net.Listener, error) {
	out := map[string]net.Listener{}
	for name, addr := range addrs {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			for _, o := range out {
				o.Close()
			}
			return nil, fmt.Errorf("%s listener on %s: %w", name, addr, err)
		}
		out[name] = l
	}
	return out, nil
}

// currentConfig is the config in force.
func (a *app) currentConfig() *config.Config {
	a.cfgMu.Lock()
	defer a.cfgMu.Unlock()
	return a.cfg
}

// setSecrets tells the redactor what must never be shown under cfg.
func (a *app) setSecrets(cfg *config.Config) {
	a.redactor.Set(append(cfg.Secrets(os.Getenv), a.adminToken))
}

// configReloaded tells operators how a reload of the config file went:
// an event (config_reloaded, or config_refused with why) and the reload
// metrics, so that a refused edit is seen without reading the log.
func (a *app) configReloaded(err error) {
	now := time.Now()
	a.metrics.ConfigReload(err == nil, now)
	if err != nil {
		a.events.Publish(admin.Event{Time: now, Kind: "config_refused", Detail: "the running config stays: " + err.Error()})
		return
	}
	a.events.Publish(admin.Event{Time: now, Kind: "config_reloaded"})
}

// reconfigure applies a reloaded config to every part.
func (a *app) reconfigure(cfg *config.Config) {
	a.setSecrets(cfg)
	a.mgr.Update(cfg) // a new View, which the xDS server follows
	a.ep.SetFairness(fairnessOf(cfg))
	a.ep.SetModels(extprocModels(cfg))
	a.ep.SetTrustModelHeader(cfg.TrustModelHeader)
	a.metrics.Models(cfg.ModelNames())
	a.cfgMu.Lock()
	a.cfg = cfg
	a.cfgMu.Unlock()
}

// shutdown answers new requests 503, lets those in flight finish for up to
// shutdown_timeout, and stops. Fake sim servers are stopped too, as no
// next vgw can adopt them; Docker's are left running for the next to adopt.
func (a *app) shutdown() {
	cfg := a.currentConfig()
	grace := cfg.ShutdownTimeout.Std()
	a.log.Info("shutting down", slog.Duration("grace", grace))
	a.ready.Store(false)
	a.stopping.Store(true)
	a.ep.SetDraining(true)
	a.health.Shutdown()
	a.adminHealth.Shutdown()
	done := make(chan struct{})
	go func() { a.extprocGRPC.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		a.extprocGRPC.Stop()
	}
	if cfg.Runtime.Kind == "sim" {
		stop, cancel := context.WithTimeout(context.Background(), grace)
		a.mgr.StopAll(stop)
		cancel()
	}
	// Stop, not GracefulStop: ADS and WatchEvents streams never end by
	// themselves.
	a.xdsGRPC.Stop()
	a.adminGRPC.Stop()
	a.http.Close()
	a.stop()
	<-a.done
	a.closeGPUs()
}

// streamIdleBound is how long an ext_proc stream may stay silent before
// its response begins: a minute past Envoy's stream_idle_timeout, by
// which Envoy has ended any request it still had (0: Envoy sets no such
// timeout, and vgw no bound).
func streamIdleBound(envoyIdle time.Duration) time.Duration {
	if envoyIdle <= 0 {
		return 0
	}
	return envoyIdle + time.Minute
}

// extprocModels lists the configured models with their resolved limits,
// and every other name that routes to each (config.Names).
func extprocModels(cfg *config.Config) []extproc.Model {
	byModel := map[string]*extproc.Model{}
	var ms []extproc.Model
	for _, name := range cfg.ModelNames() {
		defaults, _ := cfg.RequestDefaultsOf(name) // validated
		ms = append(ms, extproc.Model{Name: name, Cluster: xds.ClusterName(name), Limits: extproc.Limits(cfg.LimitsOf(name)), Defaults: defaults})
	}
	for i := range ms {
		byModel[ms[i].Name] = &ms[i]
	}
	names := cfg.Names()
	if n, ok := names[cfg.DefaultModel]; ok {
		byModel[n.Model].DefaultFor = cfg.DefaultModel
	}
	for _, n := range slices.Sorted(maps.Keys(names)) {
		m := byModel[names[n].Model]
		switch names[n].Kind {
		case config.NameRepo, config.NameAlias:
			m.Aliases = append(m.Aliases, n)
		case config.NameAdapter:
			m.Adapters = append(m.Adapters, n)
		}
	}
	return ms
}

// fairnessOf resolves how tenants share each model's queue.
func fairnessOf(cfg *config.Config) extproc.Fairness {
	f := extproc.Fairness{
		TenantHeader:      cfg.TenantHeader,
		ObjectiveHeader:   cfg.ObjectiveHeader,
		Objectives:        cfg.Objectives,
		MaxQueuePerTenant: cfg.MaxQueuePerTenant,
		VTC:               cfg.Fairness == config.FairVTC,
	}
	for _, name := range slices.Sorted(maps.Keys(cfg.Tenants)) {
		t := cfg.Tenants[name]
		x := extproc.Tenant{Name: name, Weight: t.FairWeight(), MaxQueue: cfg.TenantMaxQueue(name)}
		if t != nil {
			x.RPM, x.TPM = t.RPM, t.TPM
		}
		f.Tenants = append(f.Tenants, x)
	}
	return f
}
