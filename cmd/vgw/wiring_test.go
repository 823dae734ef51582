package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/moby/moby/client"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/envoy/envoytest"
	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/manager/runtime/docker"
	"github.com/vgw-project/vgw/manager/runtime/docker/dockertest"
	"github.com/vgw-project/vgw/xds"
)

// stack is a whole vgw (startApp, as vgw serve runs it) on loopback
// ports, with an Envoy in front of it.
type stack struct {
	*fakeEnvoy
	app   *app
	mgr   *manager.Manager
	loads func(model string) int
}

func startStack(t testing.TB, yaml string, opts ...envoytest.Option) *stack {
	t.Helper()
	cfg, err := config.Parse("stack.yaml", []byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = config.Listen{ExtProc: "127.0.0.1:0", XDS: "127.0.0.1:0", Admin: "127.0.0.1:0", HTTP: "127.0.0.1:0"}
	var mu sync.Mutex
	loads := map[string]int{}
	a, err := startApp(cfg, slog.New(slog.DiscardHandler), appOptions{onEvent: func(e manager.Event) {
		if e.Kind == manager.EventLoadStarted {
			mu.Lock()
			loads[e.Model]++
			mu.Unlock()
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.shutdown)
	s := &stack{app: a, mgr: a.mgr, fakeEnvoy: newFakeEnvoy(t, a.extprocAddr.String(), a.xdsAddr.String(), opts...)}
	s.loads = func(model string) int { mu.Lock(); defer mu.Unlock(); return loads[model] }
	return s
}

// fakeEnvoy is an Envoy in front of vgw, as envoy/envoy.yaml sets one up.
type fakeEnvoy struct{ *envoytest.Envoy }

func newFakeEnvoy(t testing.TB, extprocAddr, xdsAddr string, opts ...envoytest.Option) *fakeEnvoy {
	return &fakeEnvoy{envoytest.Start(t, "../../envoy/envoy.yaml", extprocAddr, xdsAddr, opts...)}
}

// servesOnceReady waits for an always-on model to be ready, then checks
// that a request for it is served: the baseline before a fault.
func (s *stack) servesOnceReady(t *testing.T, model string) {
	t.Helper()
	s.eventuallyWithin(t, time.Minute, model+" is ready", func() bool { return serving(s.mgr, model) }, nil)
	if r := s.ask(t, model); r.Status != 200 {
		t.Fatalf("%s before the fault: %d %s", model, r.Status, r.Body)
	}
}

// askAll sends n requests for model at once and returns their results.
func (s *fakeEnvoy) askAll(t testing.TB, model string, n int) []*extproctest.Result {
	results := make([]*extproctest.Result, n)
	var wg sync.WaitGroup
	for i := range results {
		wg.Go(func() { results[i] = s.ask(t, model) })
	}
	wg.Wait()
	return results
}

func (s *fakeEnvoy) ask(t testing.TB, model string) *extproctest.Result {
	t.Helper()
	res, err := s.ExtProc.Do(context.Background(), extproctest.Request{Body: []byte(`{"model":"` + model + `","messages":[],"max_tokens":2}`)})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

const stackConfig = `
runtime: {kind: sim}
load_timeout: 1m
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
	for i, r := range s.askAll(t, "llama", 20) {
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
	if serving(s.mgr, "llama") {
		t.Fatal("llama is still loaded beside qwen")
	}
}

// TestColdModelBehindHealthChecks: with Envoy's active health checks on
// (envoy.health_check_interval), the host a load adds starts failing its
// first check (upstream_impl.cc), and the requests vgw releases at the ACK
// reach it anyway: a lone unhealthy host puts the cluster in panic, where
// every host takes traffic (load_balancer_impl.cc). None gets a 503.
func TestColdModelBehindHealthChecks(t *testing.T) {
	s := startStack(t, stackConfig+"envoy: {health_check_interval: 10s}\n")
	if hc := s.ADS.Cluster(xds.ClusterName("llama")).GetHealthChecks(); len(hc) == 0 {
		t.Fatal("the model's cluster has no health checks")
	}
	for i, r := range s.askAll(t, "llama", 20) {
		if r.Status != 200 {
			t.Fatalf("request %d: %d %s %q", i, r.Status, r.Details, r.Body)
		}
	}
	if n := s.loads("llama"); n != 1 {
		t.Fatalf("%d loads for 20 requests, want 1", n)
	}
}

// TestDistinctAnswers: an unknown model is 404, a model that fails to
// load is 503 with how it failed (its log is for operators), one that cannot fit is 503 with where the
// memory is, both with Retry-After.
func TestDistinctAnswers(t *testing.T) {
	s := startStack(t, stackConfig)
	if r := s.ask(t, "nope"); r.Status != 404 {
		t.Fatalf("unknown: %d", r.Status)
	}
	r := s.ask(t, "broken")
	if r.Status != 503 || r.Get("retry-after") == "" || !strings.Contains(string(r.Body), "its server exited (exited, code 1)") ||
		strings.Contains(string(r.Body), "memory profiling") {
		t.Fatalf("broken: %d retry-after %q body %q", r.Status, r.Get("retry-after"), r.Body)
	}
	r = s.ask(t, "huge")
	if r.Status != 503 || !strings.Contains(string(r.Body), "cannot place huge") || !strings.Contains(string(r.Body), "gpu0: 80.0GiB free of 80.0GiB") {
		t.Fatalf("huge: %d %q", r.Status, r.Body)
	}
}

// TestReleasedOnlyAfterACK: a request that waited for its model to load is
// sent on only once its Envoy has acknowledged the xDS version with the
// model's endpoint; while the Envoy has not taken that version up, the
// request waits. If the Envoy rejects the version, the request is answered
// 503 at once: vgw sends it no other version until something changes, so
// the request could only wait for its deadline (it did, then got 504
// load_timeout).
func TestReleasedOnlyAfterACK(t *testing.T) {
	s := startStack(t, stackConfig)
	s.ADS.Hold(resource.EndpointType)
	done := make(chan *extproctest.Result, 1)
	go func() { done <- s.ask(t, "llama") }()
	poll.Until(t, "llama's server is ready and published", func() bool {
		ok := serving(s.mgr, "llama")
		return ok && s.app.xds.Version() != s.ADS.Acked(resource.EndpointType)
	})
	select {
	case r := <-done:
		t.Fatalf("answered while the Envoy had not the endpoint: %d %q", r.Status, r.Body)
	case <-time.After(300 * time.Millisecond):
	}
	s.ADS.Release(resource.EndpointType)
	r := <-done
	if r.Status != 200 || !bytes.Contains(r.Body, []byte("token")) {
		t.Fatalf("got %d %q, want the model's answer", r.Status, r.Body)
	}

	s = startStack(t, stackConfig)
	s.ADS.Reject(resource.EndpointType, "bad endpoint")
	began := time.Now()
	r = s.ask(t, "qwen") // the version with qwen's endpoint is rejected
	if r.Status != 503 || errorCode(r) != "model_unavailable" || r.Get("retry-after") == "" || !strings.Contains(string(r.Body), "the proxy has not taken up where the model runs") {
		t.Fatalf("a request whose Envoy rejected its model's endpoint: %d %q", r.Status, r.Body)
	}
	if d := s.app.ep.Decisions().Recent(extproc.Filter{Model: "qwen", Limit: 1}); len(d) != 1 || d[0].Reason != extproc.ReasonNotRoutable {
		t.Errorf("decision %+v, want not_routable", d)
	}
	if waited := time.Since(began); waited > s.app.cfg.LoadTimeout.Std() {
		t.Errorf("answered after %v: it waited for its deadline", waited)
	}
}

// TestDockerThroughTheStack: with the Docker runtime, a request for a cold
// model starts its container on the Docker network, Envoy is given the
// container's address there, and the request reaches the server in it.
func TestDockerThroughTheStack(t *testing.T) {
	e := dockertest.Need(t)
	s := startStack(t, fmt.Sprintf(`
runtime: {kind: docker, image: %s, network: %s, instance: %s}
load_timeout: 20s
gpus: [{name: g0, memory: 80GiB}]
models:
  llama: {repo: meta-llama/Llama-3.1-8B-Instruct, vram: 30GiB}
`, e.Image, e.Network, e.Instance(t)))
	r := s.ask(t, "llama")
	if r.Status != 200 || !strings.Contains(string(r.Body), `"model":"llama"`) {
		t.Fatalf("llama: %d %s", r.Status, r.Body)
	}
	eps := s.ADS.Endpoints("model/llama")
	c, err := e.Client.ContainerInspect(context.Background(), docker.ContainerName(s.app.currentConfig().Runtime.Instance, "llama"), client.ContainerInspectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ip := c.Container.NetworkSettings.Networks[e.Network].IPAddress.String()
	if len(eps) != 1 || eps[0] != ip+":8000" {
		t.Errorf("Envoy's endpoints %v, want the container's address %s:8000", eps, ip)
	}
}
