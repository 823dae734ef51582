package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/vgw-project/vgw/admin/admintest"
	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/internal/secrets"
	adminv1 "github.com/vgw-project/vgw/proto/adminv1"
)

// grpcurlPath returns the grpcurl that go.mod pins as a tool (built by
// `go tool` into the build cache): the tests drive vgw with the real
// grpcurl, as operators do.
var grpcurlPath = sync.OnceValues(func() (string, error) {
	out, err := exec.Command("go", "tool", "-n", "grpcurl").Output()
	if err != nil {
		return "", fmt.Errorf("go tool -n grpcurl: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
})

// newGrpcurl returns grpcurl aimed at addr.
func newGrpcurl(t *testing.T, addr, token string) *grpcurl {
	t.Helper()
	bin, err := grpcurlPath()
	if err != nil {
		t.Fatal(err)
	}
	return &grpcurl{t: t, bin: bin, addr: addr, token: token}
}

// grpcurl runs the grpcurl binary against one admin address.
type grpcurl struct {
	t     *testing.T
	bin   string
	addr  string
	token string
	tls   []string // grpcurl's TLS flags; none means -plaintext
	mu    sync.Mutex
	seen  bytes.Buffer // everything grpcurl printed, to look for secrets in
}

// run runs grpcurl with args before the address and after it, with the
// given token ("" for none).
func (g *grpcurl) run(token string, before []string, after ...string) ([]byte, error) {
	g.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	args := g.tls
	if len(args) == 0 {
		args = []string{"-plaintext"}
	}
	if token != "" {
		args = append(args, "-H", "authorization: Bearer "+token)
	}
	args = append(append(append(args, before...), g.addr), after...)
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, g.bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	g.mu.Lock()
	g.seen.Write(stdout.Bytes())
	g.seen.Write(stderr.Bytes())
	g.mu.Unlock()
	if err != nil {
		return stdout.Bytes(), errors.New(stderr.String())
	}
	return stdout.Bytes(), nil
}

// call calls an Admin RPC with the token and decodes its answer.
func (g *grpcurl) call(method, req string, resp proto.Message) {
	g.t.Helper()
	out, err := g.run(g.token, []string{"-d", req}, "vgw.admin.v1.Admin/"+method)
	if err != nil {
		g.t.Fatalf("grpcurl %s %s: %v", method, req, err)
	}
	if err := protojson.Unmarshal(out, resp); err != nil {
		g.t.Fatalf("grpcurl %s: %v\n%s", method, err, out)
	}
}

// fails calls an Admin RPC that must fail, and returns grpcurl's error.
func (g *grpcurl) fails(token, method, req string) string {
	g.t.Helper()
	_, err := g.run(token, []string{"-d", req}, "vgw.admin.v1.Admin/"+method)
	if err == nil {
		g.t.Fatalf("grpcurl %s %s succeeded", method, req)
	}
	return err.Error()
}

// watch runs WatchEvents until the test ends, keeping each event; it
// returns once the watch is live.
func (g *grpcurl) watch() *watched {
	g.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, g.bin, "-plaintext", "-H", "authorization: Bearer "+g.token, g.addr, "vgw.admin.v1.Admin/WatchEvents")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		g.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		g.t.Fatal(err)
	}
	g.t.Cleanup(func() { cancel(); cmd.Wait() })
	w := &watched{t: g.t}
	go func() {
		dec := json.NewDecoder(io.TeeReader(stdout, writerFunc(func(p []byte) {
			g.mu.Lock()
			g.seen.Write(p)
			g.mu.Unlock()
		})))
		for {
			var raw json.RawMessage
			if dec.Decode(&raw) != nil {
				return
			}
			e := &adminv1.Event{}
			if protojson.Unmarshal(raw, e) == nil {
				w.mu.Lock()
				w.events = append(w.events, e)
				w.mu.Unlock()
			}
		}
	}()
	if e := w.await("watching", ""); e.GetDetail() != "events for all models follow" {
		g.t.Errorf("first event %v", e)
	}
	return w
}

// watched holds the events a watch has delivered.
type watched struct {
	t      *testing.T
	mu     sync.Mutex
	events []*adminv1.Event
}

// await returns the first event of kind for model, waiting for it.
func (w *watched) await(kind, model string) *adminv1.Event {
	w.t.Helper()
	var found *adminv1.Event
	poll.Until(w.t, "a "+kind+" event for "+model, func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		for _, e := range w.events {
			if e.GetKind() == kind && e.GetModel() == model {
				found = e
				return true
			}
		}
		return false
	})
	return found
}

type writerFunc func([]byte)

func (f writerFunc) Write(p []byte) (int, error) { f(p); return len(p), nil }

const (
	hfToken     = "hf_ThisMustNeverBeShown"
	adminToken  = "admin-token-never-shown"
	clientToken = "sk-client-key-never-shown"
	apiKey      = "sk-vllm-api-key-never-shown"
)

const adminConfig = `log_format: json
envoy: {xds_grace: 100ms}
min_resident: 0s
load_timeout: 1m
runtime: {kind: sim, env: {HF_TOKEN: ` + hfToken + `}}
gpus: [{name: sim0, memory: 80GiB}]
models:
  llama: {vram: 30GiB, sim: {startup_delay: 50ms}}
  qwen: {vram: 60GiB, env: {HF_TOKEN: ` + hfToken + `}, sim: {startup_delay: 50ms}}
  broken: {vram: 10GiB, extra_args: ["--api-key", "` + apiKey + `"], sim: {fail_start: true}}
`

// serveWithToken runs vgw serve on config (YAML), its admin service
// behind adminToken, read from a file as an operator keeps it.
func serveWithToken(t *testing.T, config string) (*lockedBuffer, func(string) string) {
	t.Helper()
	dir := t.TempDir()
	cfgPath, tokenPath := filepath.Join(dir, "vgw.yaml"), filepath.Join(dir, "token")
	os.WriteFile(cfgPath, []byte(config), 0o600)
	os.WriteFile(tokenPath, []byte(adminToken+"\n"), 0o600)
	return startServe(t, "--config", cfgPath, "--admin-token-file", tokenPath)
}

// TestAdminWithGrpcurl drives a running vgw serve (sim runtime, a token,
// an Envoy in front) with the real grpcurl, as an operator would: it
// lists and describes the service, loads, pins and unloads models, turns
// on debug logging and reads decisions, watches events, drains, and is
// refused without the token; then it scrapes /metrics and reads /status.
// Nothing it sees carries a secret.
func TestAdminWithGrpcurl(t *testing.T) {
	logs, addr := serveWithToken(t, adminConfig)
	ctx := context.Background()
	g := newGrpcurl(t, addr("admin"), adminToken)
	envoy := newFakeEnvoy(t, addr("extproc"), addr("xds"))

	// Reflection needs no token: the service shows itself.
	out, err := g.run("", nil, "list")
	if err != nil {
		t.Fatal(err)
	}
	for _, svc := range []string{"vgw.admin.v1.Admin", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} {
		if !strings.Contains(string(out), svc+"\n") {
			t.Errorf("list lacks %s:\n%s", svc, out)
		}
	}
	out, _ = g.run("", nil, "list", "vgw.admin.v1.Admin")
	for _, m := range []string{"GetStatus", "ListModels", "LoadModel", "UnloadModel", "PinModel", "UnpinModel", "SetLogLevel", "ListDecisions", "WatchEvents", "Drain"} {
		if !strings.Contains(string(out), "vgw.admin.v1.Admin."+m+"\n") {
			t.Errorf("list vgw.admin.v1.Admin lacks %s:\n%s", m, out)
		}
	}
	out, _ = g.run("", nil, "describe", "vgw.admin.v1.Admin.LoadModel")
	if !strings.Contains(string(out), "rpc LoadModel ( .vgw.admin.v1.LoadModelRequest ) returns ( .vgw.admin.v1.LoadModelResponse )") {
		t.Errorf("describe LoadModel:\n%s", out)
	}
	out, _ = g.run("", nil, "grpc.health.v1.Health/Check")
	if !strings.Contains(string(out), "SERVING") {
		t.Errorf("health: %s", out)
	}

	// Without the right token, every Admin RPC is refused.
	for _, token := range []string{"", "wrong-token"} {
		if e := g.fails(token, "GetStatus", "{}"); !strings.Contains(e, "Unauthenticated") || strings.Contains(e, "wrong-token") {
			t.Errorf("token %q: %s", token, e)
		}
	}

	events := g.watch()

	// A model whose server fails as it starts: its log tail, which repeats
	// its arguments (--api-key included) as vLLM's does, comes back with
	// the key masked in the error, the event, the status and vgw's log.
	if e := g.fails(adminToken, "LoadModel", `{"model":"broken","wait":true}`); !strings.Contains(e, "Unavailable") ||
		!strings.Contains(e, "memory profiling") || !strings.Contains(e, "--api-key "+secrets.Mask) {
		t.Errorf("LoadModel broken: %s", e)
	}
	if e := events.await("load_failed", "broken"); !strings.Contains(e.GetDetail(), "--api-key "+secrets.Mask) {
		t.Errorf("load_failed event: %v", e)
	}
	// A client that asks for it is told that it failed, but not the
	// server's log: that is for operators.
	refused := envoy.ask(t, "broken")
	if refused.Status != 503 || !strings.Contains(string(refused.Body), "broken failed to load: its server exited") ||
		strings.Contains(string(refused.Body), "memory profiling") {
		t.Errorf("a request for broken: %d %s", refused.Status, refused.Body)
	}

	var loaded adminv1.LoadModelResponse
	g.call("LoadModel", `{"model":"llama","wait":true}`, &loaded)
	if m := loaded.GetModel(); m.GetState() != "ready" || m.GetEndpoint() == "" || len(m.GetGpus()) != 1 || m.GetFootprintSource() != "declared" {
		t.Fatalf("LoadModel: %v", m)
	}
	events.await("load_started", "llama")
	events.await("ready", "llama")

	// GPU memory is read live (every 500 ms, and as loads and stops end).
	var st adminv1.Status
	poll.Until(t, "GetStatus shows llama's memory in use", func() bool {
		g.call("GetStatus", "{}", &st)
		gpu := st.GetGpus()
		return len(gpu) == 1 && gpu[0].GetTotalBytes() == 80<<30 && gpu[0].GetUsedBytes() == 30<<30 && gpu[0].GetFreeBytes() == 50<<30
	})
	if st.GetConfig().GetLogLevel() != "info" || st.GetConfig().GetRuntime() != "sim" || len(st.GetModels()) != 3 {
		t.Errorf("GetStatus: %v", &st)
	}
	if b := st.GetModels()[0]; b.GetName() != "broken" || !strings.Contains(b.GetLastError(), "--api-key "+secrets.Mask) || b.GetRetryAt() == nil {
		t.Errorf("GetStatus for broken: %v", b)
	}
	if n := st.GetEnvoys(); len(n) != 1 || n[0].GetNode() != envoy.Node() || n[0].GetEndpointsVersion() == "" {
		t.Errorf("GetStatus Envoys: %v", n)
	}

	var lvl adminv1.SetLogLevelResponse
	g.call("SetLogLevel", `{"level":"debug"}`, &lvl)
	if lvl.GetPrevious() != "info" || lvl.GetLevel() != "debug" {
		t.Errorf("SetLogLevel: %v", &lvl)
	}
	// A request (carrying a client's key, which must go nowhere) now shows
	// up as a DEBUG decision in the log, and in ListDecisions.
	res, err := envoy.ExtProc.Do(ctx, extproctest.Request{
		Headers: []extproctest.Header{{Key: "authorization", Value: "Bearer " + clientToken}},
		Body:    []byte(`{"model":"llama","messages":[],"max_tokens":2}`),
	})
	if err != nil || res.Status != 200 {
		t.Fatalf("request for llama: %v %v", res, err)
	}
	var debugLine map[string]any
	poll.Until(t, "a DEBUG decision for llama in the log", func() bool {
		for _, l := range logs.lines() {
			if l["msg"] == "decision" && l["level"] == "DEBUG" && l["model"] == "llama" && l["outcome"] == "admitted" {
				debugLine = l
				return true
			}
		}
		return false
	})
	if debugLine["reason"] == "" {
		t.Errorf("decision line without a reason: %v", debugLine)
	}
	var ds adminv1.ListDecisionsResponse
	g.call("ListDecisions", `{"model":"llama","outcome":"admitted"}`, &ds)
	if len(ds.GetDecisions()) == 0 || ds.GetDecisions()[0].GetModel() != "llama" || ds.GetDecisions()[0].GetReason() == "" {
		t.Errorf("ListDecisions: %v", &ds)
	}
	g.call("ListDecisions", `{"model":"qwen"}`, &ds)
	if len(ds.GetDecisions()) != 0 {
		t.Errorf("ListDecisions for qwen before any request: %v", &ds)
	}
	// The request named no tenant: it is the shared flow's, at priority 0.
	g.call("ListDecisions", `{"tenant":"default-flow"}`, &ds)
	if len(ds.GetDecisions()) == 0 || ds.GetDecisions()[0].GetTenant() != "default-flow" || ds.GetDecisions()[0].GetPriority() != 0 {
		t.Errorf("ListDecisions for default-flow: %v", &ds)
	}
	g.call("ListDecisions", `{"tenant":"nobody"}`, &ds)
	if len(ds.GetDecisions()) != 0 {
		t.Errorf("ListDecisions for a tenant that sent nothing: %v", &ds)
	}

	// A request for qwen evicts llama (both do not fit) and waits for the
	// load: an eviction, a load and a queue wait for the metrics.
	if r := envoy.ask(t, "qwen"); r.Status != 200 {
		t.Fatalf("request for qwen: %d %s", r.Status, r.Body)
	}
	events.await("evicted", "llama")
	events.await("ready", "qwen")
	g.call("ListDecisions", `{"model":"qwen"}`, &ds)
	if d := ds.GetDecisions(); len(d) != 2 || d[0].GetOutcome() != "admitted" || d[0].GetReason() != "model_ready" || d[0].GetWait().AsDuration() <= 0 ||
		d[1].GetOutcome() != "queued" || d[1].GetReason() != "wait_load" {
		t.Errorf("qwen's decisions, newest first: %v", d)
	}

	// Pinned, qwen is not evicted for llama: llama cannot load.
	var pinned adminv1.PinModelResponse
	g.call("PinModel", `{"model":"qwen"}`, &pinned)
	if !pinned.GetModel().GetPinned() {
		t.Errorf("PinModel: %v", pinned.GetModel())
	}
	if e := g.fails(adminToken, "LoadModel", `{"model":"llama","wait":true,"timeout":"300ms"}`); !strings.Contains(e, "Unavailable") || !strings.Contains(e, "qwen") {
		t.Errorf("LoadModel while qwen is pinned: %s", e)
	}
	var unpinned adminv1.UnpinModelResponse
	g.call("UnpinModel", `{"model":"qwen"}`, &unpinned)
	if unpinned.GetModel().GetPinned() {
		t.Errorf("UnpinModel: %v", unpinned.GetModel())
	}
	if e := g.fails(adminToken, "PinModel", `{"model":"nope"}`); !strings.Contains(e, "NotFound") {
		t.Errorf("PinModel of an unknown model: %s", e)
	}

	// The Envoy rejects the next endpoints; the unload that follows makes
	// one, and the NACK is an event and in the status.
	envoy.ADS.Reject(resource.EndpointType, "endpoint rejected for the test")
	var unloaded adminv1.UnloadModelResponse
	g.call("UnloadModel", `{"model":"qwen"}`, &unloaded)
	if s := unloaded.GetModel().GetState(); s != "draining" && s != "stopped" {
		t.Errorf("UnloadModel: %v", unloaded.GetModel())
	}
	events.await("unloaded", "qwen")
	if e := events.await("xds_nack", ""); !strings.Contains(e.GetDetail(), "endpoint rejected for the test") {
		t.Errorf("NACK event: %v", e)
	}
	g.call("GetStatus", "{}", &st)
	if n := st.GetEnvoys(); len(n) != 1 || !strings.Contains(n[0].GetLastNack().GetError(), "endpoint rejected for the test") {
		t.Errorf("status after a NACK: %v", n)
	}

	var drain adminv1.DrainResponse
	g.call("Drain", `{"drain":true}`, &drain)
	if !drain.GetDraining() {
		t.Errorf("Drain: %v", &drain)
	}
	if r := envoy.ask(t, "llama"); r.Status != 503 {
		t.Errorf("request while draining: %d", r.Status)
	}
	if code, body := httpGet(t, "http://"+addr("http")+"/readyz", ""); code != 503 || !strings.Contains(string(body), "draining") {
		t.Errorf("/readyz while draining: %d %s", code, body)
	}
	g.call("Drain", `{"drain":false}`, &drain)
	if drain.GetDraining() {
		t.Errorf("Drain false: %v", &drain)
	}

	// /metrics, parsed with Prometheus's parser.
	base := "http://" + addr("http")
	m, err := admintest.Scrape(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	exact := map[string]float64{
		`vgw_decisions_total{model="llama",outcome="admitted"}`:     1,
		`vgw_decisions_total{model="llama",outcome="rejected"}`:     1, // while draining
		`vgw_answers_total{model="llama",status="503"}`:             1,
		`vgw_decisions_total{model="qwen",outcome="admitted"}`:      1,
		`vgw_queued_total{model="qwen"}`:                            1,
		`vgw_queue_depth{model="llama"}`:                            0,
		`vgw_requests_in_flight{model="qwen"}`:                      0,
		`vgw_model_max_concurrent{model="qwen"}`:                    50,
		`vgw_queue_wait_seconds_count{model="qwen"}`:                1,
		`vgw_model_load_seconds_count{model="llama"}`:               1,
		`vgw_model_load_seconds_count{model="qwen"}`:                1,
		`vgw_model_events_total{kind="evicted",model="llama"}`:      1,
		`vgw_model_events_total{kind="crashed",model="llama"}`:      0,
		`vgw_model_events_total{kind="load_failed",model="broken"}`: 1,
		`vgw_model_state{model="llama",state="stopped"}`:            1,
		`vgw_model_state{model="qwen",state="ready"}`:               0,
		`vgw_gpu_info{gpu="0",name="sim0",uuid="GPU-sim-0"}`:        1,
		`vgw_gpu_memory_total_bytes{gpu="0"}`:                       80 << 30,
		`vgw_xds_nacks_total`:                                       1,
		`vgw_xds_connected_envoys`:                                  1,
		`vgw_draining`:                                              0,
	}
	for k, want := range exact {
		if v, ok := m[k]; !ok || v != want {
			t.Errorf("/metrics %s = %v (present: %v), want %v", k, v, ok, want)
		}
	}
	for _, k := range []string{`vgw_xds_pushes_total`, `vgw_xds_acks_total`} {
		if m[k] < 4 {
			t.Errorf("/metrics %s = %v, want at least 4", k, m[k])
		}
	}
	poll.Until(t, "/metrics shows GPU 0 empty", func() bool {
		m, err := admintest.Scrape(base + "/metrics")
		return err == nil && m[`vgw_gpu_memory_used_bytes{gpu="0"}`] == 0
	})

	// /status: the same content as GetStatus, behind the same token.
	get := func(path, token string) (int, []byte) { return httpGet(t, base+path, token) }
	if code, _ := get("/status", ""); code != 401 {
		t.Errorf("/status without the token: %d", code)
	}
	code, body := get("/status", adminToken)
	var page adminv1.Status
	if err := protojson.Unmarshal(body, &page); code != 200 || err != nil || page.GetConfig().GetLogLevel() != "debug" || len(page.GetModels()) != 3 {
		t.Errorf("/status: %d %v %s", code, err, body)
	}
	var hout, herr bytes.Buffer
	if code := run(ctx, []string{"health", "--url", base + "/readyz"}, &hout, &herr); code != 0 || !strings.Contains(hout.String(), "ready") {
		t.Errorf("vgw health: exit %d: %s %s", code, hout.String(), herr.String())
	}
	for _, p := range []string{"/healthz", "/readyz"} {
		if code, _ := get(p, ""); code != 200 {
			t.Errorf("%s: %d", p, code)
		}
	}

	// No secret anywhere an operator looks.
	_, metricsText := get("/metrics", "")
	g.mu.Lock()
	seen := g.seen.String()
	g.mu.Unlock()
	logText := logs.String()
	if !strings.Contains(logText, "--api-key "+secrets.Mask) {
		t.Error("the log does not show broken's failure, masked")
	}
	g.call("ListDecisions", `{"model":"broken"}`, &ds)
	for where, text := range map[string]string{"grpcurl's output": seen, "the log": logText, "/status": string(body),
		"/metrics": string(metricsText), "the answer to a client": string(refused.Body), "ListDecisions": protojson.Format(&ds)} {
		for _, secret := range []string{hfToken, adminToken, clientToken, apiKey} {
			if strings.Contains(text, secret) {
				t.Errorf("%s shows a secret (%.6s…)", where, secret)
			}
		}
	}
}

// httpGet fetches url, with a bearer token unless it is "".
func httpGet(t *testing.T, url, token string) (int, []byte) {
	t.Helper()
	code, body, err := admintest.Get(url, token)
	if err != nil {
		t.Fatal(err)
	}
	return code, body
}

// TestAdminTLS: with a certificate, the admin service speaks TLS only.
func TestAdminTLS(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath, cfgPath := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "vgw.yaml")
	writeSelfSigned(t, certPath, keyPath)
	os.WriteFile(cfgPath, []byte(serveConfig), 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	var logs lockedBuffer
	exit := make(chan int, 1)
	go func() {
		exit <- run(ctx, []string{"serve", "--config", cfgPath, "--admin-tls-cert", certPath, "--admin-tls-key", keyPath,
			"--extproc-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"}, io.Discard, &logs)
	}()
	t.Cleanup(func() { cancel(); <-exit })
	serving := logs.waitFor(t, "vgw serving")
	if serving["admin_tls"] != true {
		t.Errorf("serving line: %v", serving)
	}
	addr, _ := serving["admin"].(string)
	g := newGrpcurl(t, addr, "")
	g.tls = []string{"-cacert", certPath}
	var st adminv1.Status
	g.call("GetStatus", "{}", &st)
	if len(st.GetModels()) != 1 {
		t.Errorf("GetStatus over TLS: %v", &st)
	}
	plain := &grpcurl{t: t, bin: g.bin, addr: addr}
	if _, err := plain.run("", nil, "list"); err == nil {
		t.Error("the TLS admin service answered plaintext")
	}
}

// writeSelfSigned writes a certificate for 127.0.0.1, and its key.
func writeSelfSigned(t *testing.T, certPath, keyPath string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "vgw test"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600)
}
