package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/vgw-project/vgw/admin"
	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/internal/secrets"
)

func serve(ctx context.Context, args []string, stderr io.Writer) error {
	fs := newFlags("serve", stderr)
	path := fs.String("config", "", "the config file (required)")
	extprocAddr := fs.String("extproc-addr", "", "ext_proc gRPC listen address (default: config, then $VGW_EXTPROC_ADDR, then "+config.Defaults.Listen.ExtProc+")")
	xdsAddr := fs.String("xds-addr", "", "xDS (ADS) gRPC listen address (default: config, then $VGW_XDS_ADDR, then "+config.Defaults.Listen.XDS+")")
	adminAddr := fs.String("admin-addr", "", "admin gRPC listen address (default: config, then $VGW_ADMIN_ADDR, then "+config.Defaults.Listen.Admin+")")
	httpAddr := fs.String("http-addr", "", "HTTP listen address for /metrics, /status, /healthz, /readyz (default: config, then $VGW_HTTP_ADDR, then "+config.Defaults.Listen.HTTP+")")
	tokenFile := fs.String("admin-token-file", "", "a file holding the token every admin RPC and /status must carry as 'authorization: Bearer TOKEN'")
	tlsCert := fs.String("admin-tls-cert", "", "serve the admin gRPC service over TLS with this certificate (PEM); needs --admin-tls-key")
	tlsKey := fs.String("admin-tls-key", "", "the private key (PEM) for --admin-tls-cert")
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
	for flag, addr := range map[*string]*string{extprocAddr: &cfg.Listen.ExtProc, xdsAddr: &cfg.Listen.XDS, adminAddr: &cfg.Listen.Admin, httpAddr: &cfg.Listen.HTTP} {
		if *flag != "" {
			*addr = *flag
		}
	}
	level := new(slog.LevelVar)
	level.Set(cfg.SlogLevel())
	if *logLevel != "" {
		if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
			return fmt.Errorf("--log-level: %w", err)
		}
	}
	opts := appOptions{level: level, redactor: new(secrets.Redactor)}
	if *tokenFile != "" {
		if opts.adminToken, err = admin.ReadToken(*tokenFile); err != nil {
			return err
		}
	}
	if *tlsCert != "" || *tlsKey != "" {
		cert, err := tls.LoadX509KeyPair(*tlsCert, *tlsKey)
		if err != nil {
			return fmt.Errorf("--admin-tls-cert %q, --admin-tls-key %q: %w", *tlsCert, *tlsKey, err)
		}
		opts.adminTLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	log := slog.New(newHandler(cfg.LogFormat, stderr, level, opts.redactor))

	a, err := startApp(cfg, log, opts)
	if err != nil {
		return err
	}
	for _, w := range exposureWarnings(a.adminAddr, a.httpAddr, opts.adminToken != "", opts.adminTLS != nil) {
		log.Warn(w.msg, w.addr)
	}
	log.Info("vgw serving", slog.String("config", cfg.Path), slog.String("extproc", a.extprocAddr.String()), slog.String("xds", a.xdsAddr.String()),
		slog.String("admin", a.adminAddr.String()), slog.String("http", a.httpAddr.String()), slog.Bool("admin_token", opts.adminToken != ""), slog.Bool("admin_tls", opts.adminTLS != nil),
		slog.String("runtime", cfg.Runtime.Kind), slog.Int("models", len(cfg.Models)), slog.String("version", version),
		slog.Group("max_connections", slog.Int("extproc", a.caps.ExtProc), slog.Int("xds", a.caps.XDS), slog.Int("admin", a.caps.Admin), slog.Int("http", a.caps.HTTP)))

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	changed := watchFile(ctx, cfg.Path, configPoll)
	r := &reloader{log: log, level: level, levelPinned: *logLevel != "", cfg: cfg, app: a}
	for {
		select {
		case <-hup:
			r.reload("SIGHUP")
		case <-changed:
			r.reload("the file changed")
		case err := <-a.serveErr:
			a.shutdown()
			return fmt.Errorf("a gRPC server stopped: %w", err)
		case <-ctx.Done():
			a.shutdown()
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
	app         *app
}

// reload applies a new config file. A bad file is refused and the running
// config stays. Models, their limits and settings, and the log level
// apply at once (a model whose memory settings changed is reloaded once
// idle), and so do the names, request defaults, default_model and
// trust_model_header; listeners, the body limits (the ext_proc listener
// is sized by them), the runtime, the GPUs and the Envoy settings need a
// restart.
func (r *reloader) reload(why string) {
	cfg, err := loadConfig(r.cfg.Path)
	if err != nil {
		r.log.Error("config reload refused; keeping the running config", slog.String("trigger", why), slog.String("error", err.Error()))
		r.app.configReloaded(err)
		return
	}
	old := r.cfg
	// The level follows the file only when the file's level changed, so a
	// level an operator set with SetLogLevel survives an unrelated edit.
	levelChanged := cfg.LogLevel != old.LogLevel
	if cfg.Listen != old.Listen || cfg.MaxBodyBytes != old.MaxBodyBytes || cfg.MaxAudioBodyBytes != old.MaxAudioBodyBytes || cfg.Envoy != old.Envoy || cfg.Runtime.Kind != old.Runtime.Kind {
		r.log.Warn("config reloaded, but listeners, max_body_bytes, max_audio_body_bytes, envoy settings and the runtime change only on restart")
		cfg.Listen, cfg.MaxBodyBytes, cfg.MaxAudioBodyBytes, cfg.Envoy, cfg.Runtime.Kind = old.Listen, old.MaxBodyBytes, old.MaxAudioBodyBytes, old.Envoy, old.Runtime.Kind
	}
	cfg.GPUs = old.GPUs
	r.app.reconfigure(cfg)
	if !r.levelPinned && levelChanged {
		r.level.Set(cfg.SlogLevel())
	}
	r.cfg = cfg
	r.log.Info("config reloaded", slog.String("trigger", why), slog.Int("models", len(cfg.Models)))
	r.app.configReloaded(nil)
}

// newHandler returns the log handler, masking secrets in every line.
func newHandler(format string, w io.Writer, level slog.Leveler, r *secrets.Redactor) slog.Handler {
	opts := &slog.HandlerOptions{Level: level, ReplaceAttr: r.ReplaceAttr}
	if format == "text" {
		return slog.NewTextHandler(w, opts)
	}
	return slog.NewJSONHandler(w, opts)
}

// exposureWarning is one way the admin listeners are open to the network.
type exposureWarning struct {
	msg  string
	addr slog.Attr // the listener it is about
}

// exposureWarnings decides what serve warns of, given the addresses the
// admin gRPC service and the HTTP pages are bound to, whether a token is
// set, and whether the admin service has TLS: an admin service beyond
// loopback with no token (anyone who reaches it can act), or with a token
// but no TLS (the token crosses the network in clear text), and HTTP
// pages beyond loopback when a token is set (they are plain HTTP). It
// only decides, so that it can be tested; serve logs.
func exposureWarnings(adminAddr, httpAddr net.Addr, token, adminTLS bool) []exposureWarning {
	var out []exposureWarning
	switch {
	case !token && !isLoopback(adminAddr):
		out = append(out, exposureWarning{"the admin service listens beyond loopback with no token: anyone who reaches it can load, unload and drain models; see --admin-token-file",
			slog.String("admin", adminAddr.String())})
	case token && !adminTLS && !isLoopback(adminAddr):
		out = append(out, exposureWarning{"the admin token crosses the network in clear text: the admin service listens beyond loopback without TLS; see --admin-tls-cert",
			slog.String("admin", adminAddr.String())})
	}
	if token && !isLoopback(httpAddr) {
		out = append(out, exposureWarning{"the HTTP pages (plain HTTP) listen beyond loopback: the token /status needs crosses the network in clear text",
			slog.String("http", httpAddr.String())})
	}
	return out
}

// isLoopback reports whether addr is a loopback address.
func isLoopback(addr net.Addr) bool {
	t, ok := addr.(*net.TCPAddr)
	return ok && t.IP.IsLoopback()
}
