package main

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/vgw-project/vgw/admin/admintest"
	adminv1 "github.com/vgw-project/vgw/proto/adminv1"
)

// TestReloadRefused: a config file broken in each way an edit can break
// it is refused as a whole. The running config stays (its model still
// serves, nothing else appears), and the refusal is reported where an
// operator looks: the log (with the file and line), a config_refused
// event, and vgw_config_last_reload_successful at 0 until a good file is
// applied.
func TestReloadRefused(t *testing.T) {
	cfgPath := filepath.Join(t.TempDir(), "vgw.yaml")
	if err := os.WriteFile(cfgPath, []byte(serveConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	logs, addr := startServe(t, "--config", cfgPath)
	ctx := context.Background()
	envoy := newFakeEnvoy(t, addr("extproc"), addr("xds"))
	conn, err := grpc.NewClient(addr("admin"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	adm := adminv1.NewAdminClient(conn)
	events, err := adm.WatchEvents(ctx, &adminv1.WatchEventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	next := func(kind string) *adminv1.Event {
		t.Helper()
		for {
			e, err := events.Recv()
			if err != nil {
				t.Fatalf("waiting for a %s event: %v", kind, err)
			}
			if e.GetKind() == kind {
				return e
			}
		}
	}
	next("watching")
	metric := func(name string) float64 {
		t.Helper()
		m, err := admintest.Scrape("http://" + addr("http") + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		return m[name]
	}
	if metric("vgw_config_last_reload_successful") != 1 {
		t.Fatal("vgw_config_last_reload_successful is not 1 at start")
	}

	tests := []struct {
		name string
		file string
		says string // in the refusal
	}{
		{"YAML syntax", serveConfig + "  qwen: {vram: [30GiB\n", "vgw.yaml:"},
		{"unknown key", serveConfig + "  qwen: {vram: 30GiB, nope: 1}\n", "vgw.yaml:7:"},
		{"invalid value", serveConfig + "  qwen: {vram: lots}\n", "vgw.yaml:7:"},
		{"empty", "", "vgw.yaml: the file is empty"},
		{"not text", "\x00\xff\xfe binary", "vgw.yaml"},
		{"cut short", serveConfig[:len(serveConfig)/2], "vgw.yaml"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			replaceFile(t, cfgPath, tt.file)
			e := next("config_refused")
			if !strings.Contains(e.GetDetail(), "the running config stays") || !strings.Contains(e.GetDetail(), tt.says) {
				t.Errorf("event detail %q does not say %q", e.GetDetail(), tt.says)
			}
			if got := metric("vgw_config_last_reload_successful"); got != 0 {
				t.Errorf("vgw_config_last_reload_successful = %v after a refusal", got)
			}
			if got := metric(`vgw_config_reloads_total{result="refused"}`); got != float64(i+1) {
				t.Errorf("refused reloads %v, want %d", got, i+1)
			}
			if r := envoy.ask(t, "llama"); r.Status != 200 {
				t.Errorf("llama after the refusal: %d", r.Status)
			}
			if r := envoy.ask(t, "qwen"); r.Status != 404 {
				t.Errorf("qwen after the refusal: %d, want 404 (not configured)", r.Status)
			}
			st, err := adm.GetStatus(ctx, &adminv1.GetStatusRequest{})
			if err != nil || len(st.GetModels()) != 1 || st.GetModels()[0].GetName() != "llama" {
				t.Errorf("status after the refusal: %v %v", err, st)
			}
		})
	}
	refusals := 0
	for _, m := range logs.lines() {
		if m["msg"] == "config reload refused; keeping the running config" {
			refusals++
		}
	}
	if refusals != len(tests) {
		t.Errorf("%d refusals logged, want %d", refusals, len(tests))
	}

	before := time.Now().Unix()
	replaceFile(t, cfgPath, serveConfig+"  qwen: {vram: 30GiB}\n")
	next("config_reloaded")
	if metric("vgw_config_last_reload_successful") != 1 || metric("vgw_config_last_reload_success_timestamp_seconds") < float64(before) {
		t.Error("the good file is not recorded as the last reload")
	}
	if r := envoy.ask(t, "qwen"); r.Status != 200 {
		t.Errorf("qwen after the good file: %d", r.Status)
	}
}

// startServe runs vgw serve with args on loopback ports, stopping it when
// the test ends (it must exit 0), and returns its log and the address of
// each listener ("extproc", "xds", "admin", "http").
func startServe(t *testing.T, args ...string) (*lockedBuffer, func(string) string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	logs := &lockedBuffer{}
	exit := make(chan int, 1)
	go func() {
		exit <- run(ctx, append(append([]string{"serve"}, args...), "--extproc-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0",
			"--admin-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"), io.Discard, logs)
	}()
	t.Cleanup(func() {
		cancel()
		if code := <-exit; code != 0 {
			t.Errorf("serve exited %d", code)
		}
	})
	serving := logs.waitFor(t, "vgw serving")
	return logs, func(k string) string { s, _ := serving[k].(string); return s }
}

// replaceFile gives path new content whole, by rename, as the README tells
// operators to: a file written in place can be read half written, which
// vgw may see as a different (refused, or smaller) config.
func replaceFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}
