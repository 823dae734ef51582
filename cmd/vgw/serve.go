package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/manager"
)

func serve(ctx context.Context, args []string, stderr io.Writer) error {
	fs := newFlags("serve", stderr)
	path := fs.String("config", "", "the config file (required)")
	extprocAddr := fs.String("extproc-addr", "", "ext_proc gRPC listen address (default: config, then $VGW_EXTPROC_ADDR, then "+config.Defaults.Listen.ExtProc+")")
	logLevel := fs.String("log-level", "", "log level: debug, info, warn or error (default: config)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *path == "" {
		fmt.Fprintln(stderr, "vgw serve: --config is required")
		return errUsage
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		return err
	}
	if *extprocAddr != "" {
		cfg.Listen.ExtProc = *extprocAddr
	}
	level := new(slog.LevelVar)
	level.Set(cfg.SlogLevel())
	if *logLevel != "" {
		if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
			return fmt.Errorf("--log-level: %w", err)
		}
	}
	log := slog.New(newHandler(cfg.LogFormat, stderr, level))

	mgr, closeGPUs, err := newManager(cfg, log)
	if err != nil {
		return err
	}
	defer closeGPUs()
	runCtx, stopManager := context.WithCancel(context.Background())
	managerDone := make(chan struct{})
	go func() { mgr.Run(runCtx); close(managerDone) }()
	defer func() { stopManager(); <-managerDone }()

	routes := newRoutes(mgr, cfg)
	ep := extproc.New(extprocModels(cfg), routes,
		extproc.WithLogger(log),
		extproc.WithMaxBody(int(cfg.MaxBodyBytes)),
		extproc.WithLoadTimeout(cfg.LoadTimeout.Std()),
		extproc.WithMessageTimeouts(cfg.Envoy.MessageTimeout.Std(), cfg.Envoy.MaxMessageTimeout.Std()),
	)

	lis, err := net.Listen("tcp", cfg.Listen.ExtProc)
	if err != nil {
		return fmt.Errorf("ext_proc listener: %w", err)
	}
	g := grpc.NewServer(extproc.GRPCOptions(int(cfg.MaxBodyBytes))...)
	ep.Register(g)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(g, hs)
	serveErr := make(chan error, 1)
	go func() { serveErr <- g.Serve(lis) }()
	log.Info("vgw serving", slog.String("config", cfg.Path), slog.String("extproc", lis.Addr().String()),
		slog.String("runtime", cfg.Runtime.Kind), slog.Int("models", len(cfg.Models)), slog.String("version", version))

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	changed := watchFile(ctx, cfg.Path, configPoll)
	r := &reloader{log: log, level: level, levelPinned: *logLevel != "", cfg: cfg, ep: ep, mgr: mgr, routes: routes}
	for {
		select {
		case <-hup:
			r.reload("SIGHUP")
		case <-changed:
			r.reload("the file changed")
		case err := <-serveErr:
			return fmt.Errorf("ext_proc server: %w", err)
		case <-ctx.Done():
			log.Info("shutting down", slog.Duration("grace", cfg.ShutdownTimeout.Std()))
			ep.SetDraining(true)
			hs.Shutdown()
			stopGracefully(g, cfg.ShutdownTimeout.Std())
			if cfg.Runtime.Kind == "sim" {
				// Fake servers cannot be adopted by the next vgw: stop them.
				// (Docker's are left running and adopted.)
				stop, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout.Std())
				mgr.StopAll(stop)
				cancel()
			}
			return nil
		}
	}
}

// configPoll is how often the config file is checked for changes.
var configPoll = 2 * time.Second

// loadConfig reads the config file and applies the environment.
func loadConfig(path string) (*config.Config, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return nil, err
	}
	cfg.ApplyEnv(os.Getenv)
	return cfg, nil
}

// reloader re-reads the config on SIGHUP or when the file changes.
type reloader struct {
	log         *slog.Logger
	level       *slog.LevelVar
	levelPinned bool
	cfg         *config.Config // the running config
	ep          *extproc.Server
	mgr         *manager.Manager
	routes      *routes
}

// reload applies a new config file. A bad file is refused and the running
// config stays. Models, their limits and settings, and the log level
// apply at once (a model whose memory settings changed is reloaded once
// idle); listeners, the runtime, the GPUs and the Envoy settings need a
// restart.
func (r *reloader) reload(why string) {
	cfg, err := loadConfig(r.cfg.Path)
	if err != nil {
		r.log.Error("config reload refused; keeping the running config", slog.String("trigger", why), slog.String("error", err.Error()))
		return
	}
	old := r.cfg
	if cfg.Listen != old.Listen || cfg.MaxBodyBytes != old.MaxBodyBytes || cfg.Envoy != old.Envoy || cfg.Runtime.Kind != old.Runtime.Kind {
		r.log.Warn("config reloaded, but listeners, max_body_bytes, envoy settings and the runtime change only on restart")
		cfg.Listen, cfg.MaxBodyBytes, cfg.Envoy, cfg.Runtime.Kind = old.Listen, old.MaxBodyBytes, old.Envoy, old.Runtime.Kind
	}
	cfg.GPUs = old.GPUs
	r.routes.set(cfg)
	r.mgr.Update(cfg)
	r.ep.SetModels(extprocModels(cfg))
	if !r.levelPinned {
		r.level.Set(cfg.SlogLevel())
	}
	r.cfg = cfg
	r.log.Info("config reloaded", slog.String("trigger", why), slog.Int("models", len(cfg.Models)))
}

// stopGracefully lets in-flight requests finish, then cuts the rest.
func stopGracefully(g *grpc.Server, grace time.Duration) {
	done := make(chan struct{})
	go func() { g.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		g.Stop()
	}
}

func newHandler(format string, w io.Writer, level slog.Leveler) slog.Handler {
	opts := &slog.HandlerOptions{Level: level}
	if format == "text" {
		return slog.NewTextHandler(w, opts)
	}
	return slog.NewJSONHandler(w, opts)
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
