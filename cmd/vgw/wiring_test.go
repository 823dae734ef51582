package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/envoy"
	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/manager"
)

// stack is vgw's request path and GPU manager wired as vgw serve wires
// them, with an Envoy-role client whose upstream sends each request over
// HTTP to the fake vLLM the manager started for the model, as Envoy would
// once xDS points the model's cluster there.
type stack struct {
	mgr   *manager.Manager
	ep    *extproc.Server
	env   *extproctest.Envoy
	cfg   *config.Config
	loads func(model string) int
}

func startStack(t testing.TB, yaml string, opts ...extproc.Option) *stack {
	t.Helper()
	cfg, err := config.Parse("stack.yaml", []byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	loads := map[string]int{}
	mach, err := newMachine(cfg)
	if err != nil {
		t.Fatal(err)
	}
	// Count loads through the manager's events.
	mgr := manager.New(cfg, mach.runtime, mach.gpus, manager.Options{OnEvent: func(e manager.Event) {
		if e.Kind == "load_started" {
			mu.Lock()
			loads[e.Model]++
			mu.Unlock()
		}
	}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { mgr.Run(ctx); close(done) }()
	t.Cleanup(func() {
		stop, c := context.WithTimeout(context.Background(), 10*time.Second)
		mgr.StopAll(stop)
		c()
		cancel()
		<-done
		mach.close()
	})

	b, err := envoy.Load("../../envoy/envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	epc, _ := envoy.ExtProc(b)
	filter := extproctest.FilterFrom(epc)
	ep := extproc.New(extprocModels(cfg), newRoutes(mgr, cfg), append([]extproc.Option{
		extproc.WithLoadTimeout(cfg.LoadTimeout.Std()),
		extproc.WithMessageTimeouts(filter.MessageTimeout, filter.MaxMessageTimeout),
	}, opts...)...)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	ep.Register(g)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	s := &stack{mgr: mgr, ep: ep, cfg: cfg}
	s.loads = func(model string) int { mu.Lock(); defer mu.Unlock(); return loads[model] }
	s.env = extproctest.New(conn, filter, s.upstream)
	return s
}

// upstream plays the model's cluster: the model server the manager runs.
func (s *stack) upstream(ctx context.Context, f *extproctest.Forwarded) (*extproctest.Response, error) {
	model := strings.TrimPrefix(f.Cluster, "model/")
	addr, ok := s.mgr.Endpoint(model)
	if !ok {
		return nil, io.ErrUnexpectedEOF // no healthy upstream
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+"/v1/chat/completions", bytes.NewReader(f.Body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return &extproctest.Response{Status: resp.StatusCode, Body: body}, nil
}

func (s *stack) ask(t testing.TB, model string) *extproctest.Result {
	t.Helper()
	res, err := s.env.Do(context.Background(), extproctest.Request{Body: []byte(`{"model":"` + model + `","messages":[],"max_tokens":2}`)})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

const stackConfig = `
runtime: {kind: sim}
load_timeout: 2s
max_concurrent: 4
max_queue: 100
min_resident: 0s
gpus: [{name: sim0, memory: 80GiB}]
models:
  llama: {vram: 30GiB, sim: {startup_delay: 100ms}}
  qwen: {vram: 60GiB}
  broken: {vram: 10GiB, sim: {fail_start: true}}
  huge: {vram: 100GiB}
`

// TestColdModelThroughTheStack: requests for a cold model wait in its
// queue while it loads once, then all reach its server.
func TestColdModelThroughTheStack(t *testing.T) {
	s := startStack(t, stackConfig)
	var wg sync.WaitGroup
	results := make([]*extproctest.Result, 20)
	for i := range results {
		wg.Go(func() { results[i] = s.ask(t, "llama") })
	}
	wg.Wait()
	for i, r := range results {
		if r.Status != 200 || !bytes.Contains(r.Body, []byte("token token")) {
			t.Fatalf("request %d: %d %s %q", i, r.Status, r.Details, r.Body)
		}
	}
	if n := s.loads("llama"); n != 1 {
		t.Fatalf("%d loads for 20 requests, want 1", n)
	}
	// A second model that does not fit evicts the idle first one.
	if r := s.ask(t, "qwen"); r.Status != 200 {
		t.Fatalf("qwen: %d %q", r.Status, r.Body)
	}
	if _, ok := s.mgr.Endpoint("llama"); ok {
		t.Fatal("llama is still loaded beside qwen")
	}
}

// TestDistinctAnswers: an unknown model is 404, a model that fails to
// load is 503 with its reason, one that cannot fit is 503 with where the
// memory is, both with Retry-After.
func TestDistinctAnswers(t *testing.T) {
	s := startStack(t, stackConfig)
	if r := s.ask(t, "nope"); r.Status != 404 {
		t.Fatalf("unknown: %d", r.Status)
	}
	r := s.ask(t, "broken")
	if r.Status != 503 || r.Get("retry-after") == "" || !strings.Contains(string(r.Body), "memory profiling") {
		t.Fatalf("broken: %d retry-after %q body %q", r.Status, r.Get("retry-after"), r.Body)
	}
	r = s.ask(t, "huge")
	if r.Status != 503 || !strings.Contains(string(r.Body), "cannot place huge") || !strings.Contains(string(r.Body), "gpu0: 80.0GiB free of 80.0GiB") {
		t.Fatalf("huge: %d %q", r.Status, r.Body)
	}
}
