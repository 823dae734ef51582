package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/extproc"
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

	models := newStaticModels(cfg)
	log.Warn("no GPU manager yet: every configured model is routed as if resident", slog.Int("models", len(cfg.Models)))
	ep := extproc.New(extprocModels(cfg), models,
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
	log.Info("vgw serving", slog.String("config", cfg.Path), slog.String("extproc", lis.Addr().String()), slog.String("version", version))

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-hup:
			if next := reload(log, level, *logLevel != "", cfg, ep, models); next != nil {
				cfg = next
			}
		case err := <-serveErr:
			return fmt.Errorf("ext_proc server: %w", err)
		case <-ctx.Done():
			log.Info("shutting down", slog.Duration("grace", cfg.ShutdownTimeout.Std()))
			ep.SetDraining(true)
			hs.Shutdown()
			stopGracefully(g, cfg.ShutdownTimeout.Std())
			return nil
		}
	}
}

// loadConfig reads the config file and applies the environment.
func loadConfig(path string) (*config.Config, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return nil, err
	}
	cfg.ApplyEnv(os.Getenv)
	return cfg, nil
}

// reload re-reads the config on SIGHUP. A bad file is refused and the old
// config stays. Model limits and the log level apply at once; listeners
// and Envoy settings need a restart.
func reload(log *slog.Logger, level *slog.LevelVar, levelPinned bool, old *config.Config, ep *extproc.Server, models *staticModels) *config.Config {
	cfg, err := loadConfig(old.Path)
	if err != nil {
		log.Error("config reload refused; keeping the running config", slog.String("error", err.Error()))
		return nil
	}
	models.set(cfg)
	ep.SetModels(extprocModels(cfg))
	if !levelPinned {
		level.Set(cfg.SlogLevel())
	}
	if cfg.Listen != old.Listen || cfg.MaxBodyBytes != old.MaxBodyBytes || cfg.Envoy != old.Envoy {
		log.Warn("config reloaded, but listeners, max_body_bytes and envoy settings change only on restart")
	}
	log.Info("config reloaded", slog.Int("models", len(cfg.Models)))
	cfg.Listen, cfg.MaxBodyBytes, cfg.Envoy = old.Listen, old.MaxBodyBytes, old.Envoy // what is running
	return cfg
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

// staticModels stands in for the GPU manager until it lands: it routes
// every configured model to its cluster as though the model were loaded.
type staticModels struct {
	routes atomic.Pointer[map[string]extproc.Route]
}

func newStaticModels(cfg *config.Config) *staticModels {
	s := &staticModels{}
	s.set(cfg)
	return s
}

func (s *staticModels) set(cfg *config.Config) {
	routes := make(map[string]extproc.Route, len(cfg.Models))
	for name := range cfg.Models {
		routes[name] = extproc.Route{Cluster: ClusterName(name)}
	}
	s.routes.Store(&routes)
}

// ClusterName is the Envoy cluster that serves a model.
func ClusterName(model string) string { return "model/" + model }

func (s *staticModels) Route(model string) (extproc.Route, bool) {
	r, ok := (*s.routes.Load())[model]
	return r, ok
}

func (s *staticModels) Ensure(_ context.Context, model string) (extproc.Route, error) {
	if r, ok := s.Route(model); ok {
		return r, nil
	}
	return extproc.Route{}, fmt.Errorf("model %q is not configured", model)
}

func (s *staticModels) Observe(string, extproc.Result) {}
