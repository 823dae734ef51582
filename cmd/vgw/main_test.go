package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/vgw-project/vgw/envoy"
	"github.com/vgw-project/vgw/envoy/envoytest"
	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/manager/runtime/docker/dockertest"
)

// The test binary doubles as vgw for the processes a test starts (the sim
// runtime runs "vgw fakevllm"): run with VGW_TEST_MAIN=1 it is vgw.
func TestMain(m *testing.M) {
	if os.Getenv("VGW_TEST_MAIN") == "1" {
		if n, err := strconv.ParseUint(os.Getenv("VGW_TEST_NOFILE"), 10, 64); err == nil {
			// A test's vgw with few file descriptors (conns_test.go).
			syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: n, Max: n})
		}
		os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Setenv("VGW_TEST_MAIN", "1")
	// A binary built with -race sleeps a second as it exits (GORACE's
	// atexit_sleep_ms); the fake vLLM servers this binary becomes must
	// stop as fast as real ones would, or every eviction takes a second.
	os.Setenv("GORACE", strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	configPoll = 50 * time.Millisecond
	code := m.Run()
	dockertest.Cleanup()
	os.Exit(code)
}

func TestValidate(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(bad, []byte("runtime: {kind: sim}\ngpus: [{name: g, memory: 1GiB}]\nmax_queue: -1\nmodels:\n  m: {rep: x}\n"), 0o600)
	shared := filepath.Join(t.TempDir(), "shared.yaml")
	os.WriteFile(shared, []byte("runtime: {kind: sim}\ngpus: [{name: g, memory: 1GiB}]\nmodels:\n  short: {repo: org/m}\n  long: {repo: org/m, max_model_len: 131072}\n"), 0o600)
	tests := []struct {
		args     []string
		code     int
		stdout   string
		stderr   string
		notInOut string
	}{
		{args: []string{"validate", "--config", "../../examples/sim.yaml"}, code: 0, stdout: "ok: 6 models"},
		{args: []string{"validate", "--config", bad}, code: 1, stderr: bad + `:5: unknown field "rep"`},
		{args: []string{"validate", "--config", shared}, code: 0, stdout: "note: repo org/m is loaded by models long, short, so it names none of them"},
		{args: []string{"validate"}, code: 2, stderr: "--config is required"},
		{args: []string{"validate", "--nope"}, code: 2},
		{args: []string{"envoy-check", "../../envoy/envoy.yaml"}, code: 0, stdout: "envoy.yaml: ok"},
		{args: []string{"envoy-check", "--config", "../../examples/sim.yaml", "../../envoy/envoy.yaml"}, code: 0, stdout: "envoy.yaml: ok"},
		{args: []string{"envoy-check", bad}, code: 1, stdout: "bad.yaml"},
		{args: []string{"envoy-check"}, code: 2},
		{args: []string{"frobnicate"}, code: 2, stderr: "unknown command"},
		{args: []string{"version"}, code: 0, stdout: "vgw dev"},
		{args: []string{"health", "--url", "http://127.0.0.1:1/readyz", "--timeout", "1s"}, code: 1, stderr: "health:"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var out, errOut bytes.Buffer
			code := run(context.Background(), tt.args, &out, &errOut)
			if code != tt.code {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tt.code, out.String(), errOut.String())
			}
			if !strings.Contains(out.String(), tt.stdout) || !strings.Contains(errOut.String(), tt.stderr) {
				t.Fatalf("stdout %q stderr %q, want %q and %q", out.String(), errOut.String(), tt.stdout, tt.stderr)
			}
		})
	}
}

// TestEnvoyCheckAgainstConfig: a vgw config whose Envoy settings disagree
// with the bootstrap fails the check.
func TestEnvoyCheckAgainstConfig(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "vgw.yaml")
	os.WriteFile(cfg, []byte("runtime: {kind: sim}\ngpus: [{name: g, memory: 1GiB}]\nmax_body_bytes: 32MiB\nenvoy: {max_message_timeout: 10m, stream_idle_timeout: 20m}\nmodels: {m: {}}\n"), 0o600)
	var out bytes.Buffer
	if code := run(context.Background(), []string{"envoy-check", "--config", cfg, "../../envoy/envoy.yaml"}, &out, io.Discard); code != 1 {
		t.Fatalf("exit %d, want 1: %s", code, out.String())
	}
	for _, want := range []string{"max_message_timeout", "max_body_bytes", "stream_idle_timeout"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String returns everything written so far.
func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// lines returns the JSON log lines written so far.
func (l *lockedBuffer) lines() []map[string]any {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	for _, s := range strings.Split(l.b.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(s), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

func (l *lockedBuffer) waitFor(t *testing.T, msg string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		for _, m := range l.lines() {
			if m["msg"] == msg {
				return m
			}
		}
		time.Sleep(5 * time.Millisecond) // polling interval
	}
	t.Fatalf("no log line %q in:\n%s", msg, l.String())
	return nil
}

const serveConfig = `log_format: json
envoy: {xds_grace: 100ms}
runtime: {kind: sim}
gpus: [{name: g, memory: 80GiB}]
models:
  llama: {vram: 20GiB}
`

// TestServe runs vgw serve, sends it a request as Envoy would, reloads its
// config on SIGHUP (a good file, then a bad one), and shuts it down.
func TestServe(t *testing.T) {
	cfgPath := filepath.Join(t.TempDir(), "vgw.yaml")
	if err := os.WriteFile(cfgPath, []byte(serveConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var logs lockedBuffer
	exit := make(chan int)
	go func() {
		exit <- run(ctx, []string{"serve", "--config", cfgPath, "--extproc-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"}, io.Discard, &logs)
	}()
	addr, _ := logs.waitFor(t, "vgw serving")["extproc"].(string)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	hc, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || hc.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v %v", hc, err)
	}

	env := clusterEcho(t, conn)
	ask := func(model string) *extproctest.Result {
		t.Helper()
		res, err := env.Do(ctx, extproctest.Request{Body: []byte(`{"model":"` + model + `"}`)})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	// The first request for llama loads it (a fake vLLM process), then is
	// routed to its cluster.
	if res := ask("llama"); res.Status != 200 || string(res.Body) != "model/llama" {
		t.Fatalf("llama: %d %q", res.Status, res.Body)
	}
	if m := logs.waitFor(t, "model ready"); m["model"] != "llama" {
		t.Errorf("ready event %v", m)
	}
	if res := ask("qwen"); res.Status != 404 {
		t.Fatalf("qwen before reload: %d", res.Status)
	}

	// A change to the file adds a model.
	replaceFile(t, cfgPath, serveConfig+"  qwen: {vram: 30GiB}\n")
	if m := logs.waitFor(t, "config reloaded"); m["trigger"] != "the file changed" {
		t.Errorf("reload trigger %v", m["trigger"])
	}
	if res := ask("qwen"); res.Status != 200 || string(res.Body) != "model/qwen" {
		t.Fatalf("qwen after reload: %d %q", res.Status, res.Body)
	}

	// A bad one is refused and the running config stays; SIGHUP says so too.
	replaceFile(t, cfgPath, serveConfig+"  bad: {nope: 1}\n")
	syscall.Kill(os.Getpid(), syscall.SIGHUP)
	refused := logs.waitFor(t, "config reload refused; keeping the running config")
	if e, _ := refused["error"].(string); !strings.Contains(e, "vgw.yaml:7:") {
		t.Errorf("refusal %q does not say where", e)
	}
	if res := ask("qwen"); res.Status != 200 {
		t.Fatalf("qwen after a refused reload: %d", res.Status)
	}

	cancel()
	select {
	case code := <-exit:
		if code != 0 {
			t.Fatalf("serve exited %d", code)
		}
	case <-time.After(time.Minute):
		t.Fatal("serve did not shut down")
	}
}

// clusterEcho plays the ext_proc side of the shipped Envoy on conn, with a
// router whose every upstream answers 200 with the cluster it was sent to.
// Its message timer stands still: no reply is late, however busy the
// machine.
func clusterEcho(t *testing.T, conn *grpc.ClientConn) *extproctest.Envoy {
	t.Helper()
	b, err := envoy.Load("../../envoy/envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	f, err := envoytest.Filter(b)
	if err != nil {
		t.Fatal(err)
	}
	f.Clock = clockwork.NewFakeClock()
	return extproctest.New(conn, f, func(_ context.Context, f *extproctest.Forwarded) (*extproctest.Response, error) {
		return &extproctest.Response{Status: 200, Body: []byte(f.Cluster)}, nil
	})
}
