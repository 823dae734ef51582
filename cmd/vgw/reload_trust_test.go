package main

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/vgw-project/vgw/extproc/extproctest"
)

// TestReloadTrustModelHeader: an operator turns trust_model_header off
// by editing the file: from the reload on, a client's x-vgw-model changes
// nothing (it used to keep deciding the route until a restart).
func TestReloadTrustModelHeader(t *testing.T) {
	const base = "runtime: {kind: sim}\ngpus: [{name: sim0, memory: 80GiB}]\nmodels:\n  a: {vram: 100GiB}\n"
	path := filepath.Join(t.TempDir(), "vgw.yaml")
	if err := os.WriteFile(path, []byte("trust_model_header: true\n"+base), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen.ExtProc, cfg.Listen.XDS, cfg.Listen.Admin, cfg.Listen.HTTP = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	log := slog.New(slog.DiscardHandler)
	a, err := startApp(cfg, log, appOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.shutdown)
	r := &reloader{log: log, level: new(slog.LevelVar), cfg: cfg, app: a}

	if err := os.WriteFile(path, []byte("trust_model_header: false\n"+base), 0o600); err != nil {
		t.Fatal(err)
	}
	r.reload("test")
	if a.currentConfig().TrustModelHeader {
		t.Fatal("reload did not take the new value")
	}

	conn, err := grpc.NewClient(a.extprocAddr.String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	env := extproctest.New(conn, extproctest.Filter{
		Mode:              &filterv3.ProcessingMode{RequestHeaderMode: filterv3.ProcessingMode_SEND, RequestBodyMode: filterv3.ProcessingMode_BUFFERED, ResponseHeaderMode: filterv3.ProcessingMode_SEND, ResponseTrailerMode: filterv3.ProcessingMode_SEND},
		AllowModeOverride: true, MessageTimeout: time.Second, MaxMessageTimeout: time.Minute, ClusterHeader: "x-vgw-cluster",
	}, nil)
	res, err := env.Do(context.Background(), extproctest.Request{Body: []byte(`{"model":"a"}`),
		Headers: []extproctest.Header{{Key: "x-vgw-model", Value: "not-a-model"}}})
	if err != nil {
		t.Fatal(err)
	}
	// Untrusted, the body's "a" decides (503: it cannot be placed).
	if res.Status != 503 {
		t.Fatalf("after trust_model_header was reloaded to false: %d %s, want the body's model to decide (503)", res.Status, res.Body)
	}
}
