package main

import (
	"bytes"
	"context"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/vgw-project/vgw/admin/admintest"
	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager"
)

// Faults injected into a whole vgw (startApp, sim runtime) with Envoy's
// role played in front of it. Each ends with every count back to zero.

// TestBackendCrashesMidStream: the model's server dies halfway through a
// streamed response. The client has the headers and part of the stream,
// then a reset (no hang, no made-up ending); the slot is given back; the
// crash is noticed and the next request starts the model again.
func TestBackendCrashesMidStream(t *testing.T) {
	s := startStack(t, `
runtime: {kind: sim}
load_timeout: 5s
min_resident: 0s
gpus: [{name: sim0, memory: 80GiB}]
models:
  a: {vram: 20GiB, sim: {crash_mid_stream: 2, tokens_per_second: 1000}}
`)
	ctx := context.Background()
	first, err := s.Ask(ctx, "a", true)
	if err != nil || first.Status != 200 || !bytes.Contains(first.Body, []byte("[DONE]")) {
		t.Fatalf("first: %v %+v", err, first)
	}
	crashed := s.mgr.View().Models[0].Instance
	res, err := s.Ask(ctx, "a", true)
	if err != nil {
		t.Fatal(err)
	}
	if !res.UpstreamReset || res.Status != 200 || !bytes.Contains(res.Body, []byte("data: ")) || bytes.Contains(res.Body, []byte("[DONE]")) {
		t.Fatalf("the crashing stream: reset %v, %d %q", res.UpstreamReset, res.Status, res.Body)
	}
	s.settled(t, time.Minute)
	poll.Until(t, "the crash is noticed", func() bool { return s.mgr.View().Models[0].State != manager.Ready })
	again, err := s.Ask(ctx, "a", true)
	if err != nil || again.Status != 200 || !bytes.Contains(again.Body, []byte("[DONE]")) {
		t.Fatalf("after the crash: %v %+v", err, again)
	}
	if st := s.mgr.View().Models[0]; st.Instance == crashed || s.loads("a") != 2 {
		t.Errorf("instance %s (crashed: %s), %d loads; want a new one, loaded twice", st.Instance, crashed, s.loads("a"))
	}
	s.settled(t, time.Minute)
}

// TestBackendNeverHealthy: everyone waiting for a model whose server never
// becomes healthy gets 504 once the load's deadline has passed; while the
// failed load backs off, a request gets 503 with Retry-After without
// starting or waiting for a load; a server that exits as it starts gives
// its waiters 503.
func TestBackendNeverHealthy(t *testing.T) {
	const loadTimeout = time.Second
	s := startStack(t, `
runtime: {kind: sim}
load_timeout: 1s
gpus: [{name: sim0, memory: 80GiB}]
models:
  slow: {vram: 20GiB, sim: {startup_delay: 1h}}
`)
	type answer struct {
		status int
		code   string
		at     time.Time
	}
	askMany := func(s *stack, model string, n int) []answer {
		out := make([]answer, n)
		var wg sync.WaitGroup
		for i := range out {
			wg.Go(func() {
				res, err := s.Ask(context.Background(), model, false)
				if err != nil {
					t.Error(err)
					return
				}
				out[i] = answer{res.Status, errorCode(res), time.Now()}
			})
		}
		wg.Wait()
		return out
	}
	began := time.Now() // no load, so no deadline, starts before this
	for _, a := range askMany(s, "slow", 20) {
		if a.status != 504 || a.code != "load_timeout" || a.at.Sub(began) < loadTimeout {
			t.Errorf("waiting for slow: %d %s %v after the first request; want 504 load_timeout, not before %v", a.status, a.code, a.at.Sub(began), loadTimeout)
		}
	}
	poll.Until(t, "the manager has given up on slow", func() bool { return !statusOf(s.mgr, "slow").RetryAt.IsZero() })
	loads := s.loads("slow")
	res, err := s.Ask(context.Background(), "slow", false)
	if err != nil || res.Status != 503 || res.Get("retry-after") == "" {
		t.Errorf("during the backoff: %v %d %s, want 503 with Retry-After", err, res.Status, res.Body)
	}
	// A 503, not the 504 a wait for a load ends in here, and no load:
	// it was told of the failed load at once.
	if n := s.loads("slow"); n != loads {
		t.Errorf("a request during the backoff started a load (%d, was %d)", n, loads)
	}
	s.settled(t, time.Minute)

	// A load_timeout long enough that exiting at start is what fails the
	// load, however slowly the machine starts the server.
	s = startStack(t, `
runtime: {kind: sim}
load_timeout: 1m
gpus: [{name: sim0, memory: 80GiB}]
models:
  broken: {vram: 20GiB, sim: {fail_start: true, startup_delay: 200ms}}
`)
	for _, a := range askMany(s, "broken", 10) {
		if a.status != 503 || a.code != "model_unavailable" {
			t.Errorf("waiting for broken: %d %s; want 503 model_unavailable", a.status, a.code)
		}
	}
	s.settled(t, time.Minute)
}

// errorCode is the OpenAI error code of an answer, or "".
func errorCode(r *extproctest.Result) string {
	const key = `"code":"`
	i := bytes.Index(r.Body, []byte(key))
	if i < 0 {
		return ""
	}
	rest := r.Body[i+len(key):]
	return string(rest[:max(0, bytes.IndexByte(rest, '"'))])
}

// TestXDSStreamDropsWhileWaiting: a request waits for its model's load and
// then for its Envoy to acknowledge the endpoint, which the Envoy is slow
// to take up; its xDS stream then breaks and reconnects, and the new
// stream's ACK releases the request.
func TestXDSStreamDropsWhileWaiting(t *testing.T) {
	s := startStack(t, `
runtime: {kind: sim}
load_timeout: 10s
gpus: [{name: sim0, memory: 80GiB}]
models:
  a: {vram: 20GiB, sim: {startup_delay: 100ms}}
`)
	s.ADS.Hold(resource.EndpointType)
	done := make(chan *extproctest.Result, 1)
	go func() { done <- s.ask(t, "a") }()
	poll.Until(t, "a's server is ready and published", func() bool {
		ok := serving(s.mgr, "a")
		return ok && s.app.xds.Version() != s.ADS.Acked(resource.EndpointType)
	})
	select {
	case r := <-done:
		t.Fatalf("answered before the Envoy had the endpoint: %d %q", r.Status, r.Body)
	case <-time.After(300 * time.Millisecond):
	}
	s.ReconnectADS()
	select {
	case r := <-done:
		if r.Status != 200 || !bytes.Contains(r.Body, []byte("token")) {
			t.Fatalf("got %d %q, want a's answer", r.Status, r.Body)
		}
	case <-time.After(time.Minute):
		t.Fatal("the request was not released by the new stream's ACK")
	}
	s.settled(t, time.Minute)
}

// TestClientLeavesWhileWaitingForACK: the client goes away while its
// request waits for the Envoy's ACK; nothing is left counted.
func TestClientLeavesWhileWaitingForACK(t *testing.T) {
	s := startStack(t, `
runtime: {kind: sim}
load_timeout: 10s
gpus: [{name: sim0, memory: 80GiB}]
models:
  a: {vram: 20GiB}
`)
	s.ADS.Hold(resource.EndpointType)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan *extproctest.Result, 1)
	go func() {
		res, err := s.Ask(ctx, "a", false)
		if err != nil {
			t.Error(err)
		}
		done <- res
	}()
	poll.Until(t, "a's server is ready and published", func() bool {
		ok := serving(s.mgr, "a")
		return ok && s.app.xds.Version() != s.ADS.Acked(resource.EndpointType)
	})
	cancel()
	if r := <-done; r == nil || !r.ClientReset {
		t.Fatalf("got %+v, want the client gone", r)
	}
	s.settled(t, time.Minute)
}

// TestHungBackend: a model's server that stops answering without exiting
// (SIGSTOP, as a deadlocked vLLM) is found by its health probes: reported
// unhealthy (event, metric, log), taken out of the Envoy's routes, its
// request in flight ended once the drain runs out, and the model started
// again, so the next requests are served. It stayed ready for ever, its
// slots held until Envoy's stream idle timeout and its queue timing out
// behind them.
func TestHungBackend(t *testing.T) {
	s := startStack(t, `
runtime: {kind: sim}
load_timeout: 10s
drain_timeout: 1s
probe_interval: 1s
probe_timeout: 1s
probe_failures: 2
gpus: [{name: sim0, memory: 80GiB}]
models:
  a: {vram: 20GiB, always_on: true}
`)
	s.servesOnceReady(t, "a")
	hung := statusOf(s.mgr, "a")
	pid, err := strconv.Atoi(strings.TrimPrefix(hung.Instance, "sim-"))
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	inFlight := make(chan *extproctest.Result, 1)
	go func() { inFlight <- s.ask(t, "a") }() // reaches the hung server
	s.eventuallyWithin(t, time.Minute, "a is reported unhealthy", func() bool {
		samples, err := admintest.Scrape("http://" + s.app.httpAddr.String() + "/metrics")
		return err == nil && samples[`vgw_model_events_total{kind="unhealthy",model="a"}`] >= 1
	}, nil)
	s.eventuallyWithin(t, time.Minute, "the Envoy no longer routes to the hung server", func() bool {
		eps := s.ADS.Endpoints("model/a")
		return len(eps) == 0 || eps[0] != hung.Addr
	}, nil)
	if r := <-inFlight; r.Status == 200 {
		t.Fatalf("the request on the hung server: %+v", r)
	}
	for range 5 {
		if r := s.ask(t, "a"); r.Status != 200 {
			t.Fatalf("after the restart: %d %s", r.Status, r.Body)
		}
	}
	if st := statusOf(s.mgr, "a"); st.Instance == hung.Instance {
		t.Fatalf("still served by the hung server %s", hung.Instance)
	}
	s.settled(t, time.Minute)
}

// statusOf is one model as the manager's View shows it now.
func statusOf(m *manager.Manager, name string) manager.ModelView {
	if mv := m.View().Model(name); mv != nil {
		return *mv
	}
	return manager.ModelView{}
}

// serving reports whether the manager has the model ready.
func serving(m *manager.Manager, name string) bool { return statusOf(m, name).Endpoint != "" }
