package main

import (
	"strings"
	"testing"

	"github.com/vgw-project/vgw/admin/admintest"
	"github.com/vgw-project/vgw/internal/poll"
	adminv1 "github.com/vgw-project/vgw/proto/adminv1"
)

const sleepConfig = `log_format: json
envoy: {xds_grace: 100ms}
min_resident: 0s
load_timeout: 1m
sleep: level1
host_memory: 64GiB
runtime: {kind: sim}
gpus: [{name: sim0, memory: 80GiB}]
models:
  llama: {vram: 30GiB, sim: {sleep_delay: 10ms, wake_delay: 20ms, residual_vram: 1GiB}}
  qwen: {vram: 30GiB, sleep: off, sim: {startup_delay: 600ms}}
`

// TestSleepWithGrpcurl: an operator puts a model to sleep with grpcurl and
// sees it asleep in the status, with the host memory it holds; a client's
// request through Envoy wakes it, without a new start, and the wake shows
// in the events and in /metrics. What cannot sleep or wake says why.
func TestSleepWithGrpcurl(t *testing.T) {
	_, addr := serveWithToken(t, sleepConfig)
	g := newGrpcurl(t, addr("admin"), adminToken)
	envoy := newFakeEnvoy(t, addr("extproc"), addr("xds"))
	events := g.watch()

	out, _ := g.run("", nil, "list", "vgw.admin.v1.Admin")
	for _, m := range []string{"SleepModel", "WakeModel"} {
		if !strings.Contains(string(out), "vgw.admin.v1.Admin."+m+"\n") {
			t.Errorf("list vgw.admin.v1.Admin lacks %s:\n%s", m, out)
		}
	}
	if e := g.fails(adminToken, "SleepModel", `{"model":"llama"}`); !strings.Contains(e, "FailedPrecondition") || !strings.Contains(e, "not ready") {
		t.Errorf("SleepModel of a stopped model: %s", e)
	}
	if e := g.fails(adminToken, "WakeModel", `{"model":"llama"}`); !strings.Contains(e, "FailedPrecondition") || !strings.Contains(e, "not asleep") {
		t.Errorf("WakeModel of a stopped model: %s", e)
	}
	if r := envoy.ask(t, "llama"); r.Status != 200 {
		t.Fatalf("llama: %d %s", r.Status, r.Body)
	}
	if r := envoy.ask(t, "qwen"); r.Status != 200 {
		t.Fatalf("qwen: %d %s", r.Status, r.Body)
	}
	if e := g.fails(adminToken, "SleepModel", `{"model":"qwen"}`); !strings.Contains(e, "FailedPrecondition") || !strings.Contains(e, "sleep: off") {
		t.Errorf("SleepModel of a model with sleep off: %s", e)
	}

	var slept adminv1.SleepModelResponse
	g.call("SleepModel", `{"model":"llama","wait":true}`, &slept)
	if m := slept.GetModel(); m.GetState() != "sleeping" || m.GetSleep() != "level1" || m.GetSleepLevel() != 1 ||
		m.GetResidualBytes() != 1<<30 || m.GetHostMemoryBytes() != 29<<30 || m.GetEndpoint() == "" {
		t.Fatalf("SleepModel: %v", m)
	}
	events.await("sleeping", "llama")
	var st adminv1.Status
	g.call("GetStatus", "{}", &st)
	if st.GetHostMemoryUsedBytes() != 29<<30 || st.GetHostMemoryBudgetBytes() != 64<<30 || st.GetConfig().GetSleep() != "level1" || st.GetConfig().GetHostMemory() != "64GiB" {
		t.Errorf("GetStatus: host memory %d of %d, config %v", st.GetHostMemoryUsedBytes(), st.GetHostMemoryBudgetBytes(), st.GetConfig())
	}

	// A client's request wakes it.
	if r := envoy.ask(t, "llama"); r.Status != 200 {
		t.Fatalf("llama asleep: %d %s", r.Status, r.Body)
	}
	events.await("waking", "llama")
	if e := events.await("woken", "llama"); !strings.Contains(e.GetDetail(), "from level 1") {
		t.Errorf("woken event: %v", e)
	}
	// The decision ring says the request waited for a wake, not a load.
	var ds adminv1.ListDecisionsResponse
	g.call("ListDecisions", `{"model":"llama"}`, &ds)
	var reasons []string
	for _, d := range ds.GetDecisions() {
		reasons = append(reasons, d.GetOutcome()+"/"+d.GetReason())
	}
	if len(reasons) < 2 || reasons[0] != "admitted/model_woken" || reasons[1] != "queued/wait_wake" {
		t.Errorf("decisions for llama, newest first: %v", reasons)
	}
	var woke adminv1.WakeModelResponse
	g.call("WakeModel", `{"model":"llama","wait":true}`, &woke) // awake already: nothing to do
	if m := woke.GetModel(); m.GetState() != "ready" || m.GetSleepLevel() != 0 || m.GetHostMemoryBytes() != 0 {
		t.Errorf("WakeModel of a ready model: %v", m)
	}

	m, err := admintest.Scrape("http://" + addr("http") + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]float64{
		`vgw_model_wake_seconds_count{model="llama"}`:           1,
		`vgw_model_load_seconds_count{model="llama"}`:           1,
		`vgw_model_events_total{kind="sleeping",model="llama"}`: 1,
		`vgw_model_events_total{kind="woken",model="llama"}`:    1,
		`vgw_model_state{model="llama",state="ready"}`:          1,
		`vgw_model_state{model="llama",state="sleeping"}`:       0,
		`vgw_host_memory_used_bytes`:                            0,
		`vgw_host_memory_budget_bytes`:                          64 << 30,
	} {
		if v, ok := m[k]; !ok || v != want {
			t.Errorf("/metrics %s = %v (present: %v), want %v", k, v, ok, want)
		}
	}
}

// TestProgressWithGrpcurl: while a model loads, GetStatus shows when its
// load began and the phase of its start its server's log last told, and
// WatchEvents streams each new phase.
func TestProgressWithGrpcurl(t *testing.T) {
	_, addr := serveWithToken(t, sleepConfig)
	g := newGrpcurl(t, addr("admin"), adminToken)
	events := g.watch()
	var loaded adminv1.LoadModelResponse
	g.call("LoadModel", `{"model":"qwen"}`, &loaded)
	var st adminv1.Status
	poll.Until(t, "GetStatus to show qwen's phase", func() bool {
		g.call("GetStatus", "{}", &st)
		for _, m := range st.GetModels() {
			if m.GetName() == "qwen" && m.GetState() == "loading" && m.GetPhase() != "" && m.GetBegan() != nil {
				return true
			}
		}
		return false
	})
	if e := events.await("progress", "qwen"); !strings.HasPrefix(e.GetDetail(), "loading_weights") {
		t.Errorf("first progress event: %v", e)
	}
	events.await("ready", "qwen")
}
