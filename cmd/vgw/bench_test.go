package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"

	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/manager/runtime/docker/dockertest"
)

// startupDelay is the fake backends' own startup time in these benchmarks.
const startupDelay = 100 * time.Millisecond

const benchConfig = `
runtime: {kind: sim}
load_timeout: 30s
drain_timeout: 5s
min_resident: 0s
gpus: [{name: sim0, memory: 80GiB}]
models:
  a: {vram: 60GiB, sim: {startup_delay: 100ms}}
  b: {vram: 60GiB, sim: {startup_delay: 100ms}}
`

// BenchmarkColdStart times a request for a cold model from its first
// message to its routed answer, through ext_proc, the manager and a fake
// backend that takes startupDelay to become healthy. It reports the
// overhead beyond that delay (the measure), and beyond the
// backend's own start measured in the same run (process start included):
// see rawStart.
func BenchmarkColdStart(b *testing.B) {
	s := startStack(b, benchConfig)
	coldStarts(b, s, func() time.Duration { return rawStart(b) })
}

// coldStarts times, each round, a request for model a after every model
// has been unloaded, against raw, the backend's own start measured in the
// same round with the timer stopped.
func coldStarts(b *testing.B, s *stack, raw func() time.Duration) {
	var total, raws []time.Duration
	for b.Loop() {
		b.StopTimer()
		unloadAll(b, s.mgr)
		raws = append(raws, raw())
		b.StartTimer()
		start := time.Now()
		if r := s.ask(b, "a"); r.Status != 200 {
			b.Fatalf("a: %d %q", r.Status, r.Body)
		}
		total = append(total, time.Since(start))
	}
	report(b, "cold", total, raws)
}

// BenchmarkSwap times a request for model b while model a fills the GPU:
// a is evicted (stopped) and b loaded. The baseline is a fake backend's own
// stop and start, measured in the same run.
func BenchmarkSwap(b *testing.B) {
	s := startStack(b, benchConfig)
	var total, raw []time.Duration
	models := []string{"a", "b"}
	if r := s.ask(b, "a"); r.Status != 200 {
		b.Fatal(r.Status)
	}
	i := 0
	for b.Loop() {
		b.StopTimer()
		raw = append(raw, rawStop(b)+rawStart(b))
		b.StartTimer()
		next := models[(i+1)%2]
		start := time.Now()
		if r := s.ask(b, next); r.Status != 200 {
			b.Fatalf("%s: %d %q", next, r.Status, r.Body)
		}
		total = append(total, time.Since(start))
		i++
	}
	report(b, "swap", total, raw)
}

// report records p50 and p99 of the overheads: beyond the backend's
// startup delay, and beyond its measured raw start (and stop).
func report(b *testing.B, what string, total, raw []time.Duration) {
	overDelay := make([]float64, len(total))
	overRaw := make([]float64, len(total))
	for i := range total {
		overDelay[i] = float64(total[i]-startupDelay) / float64(time.Millisecond)
		overRaw[i] = float64(total[i]-raw[i]) / float64(time.Millisecond)
	}
	b.ReportMetric(pct(overDelay, 50), what+"-over-delay-p50-ms")
	b.ReportMetric(pct(overDelay, 99), what+"-over-delay-p99-ms")
	b.ReportMetric(pct(overRaw, 50), what+"-over-raw-p50-ms")
	b.ReportMetric(pct(overRaw, 99), what+"-over-raw-p99-ms")
	rs := make([]float64, len(raw))
	for i, r := range raw {
		rs[i] = float64(r) / float64(time.Millisecond)
	}
	b.ReportMetric(pct(rs, 50), "raw-backend-p50-ms")
}

func pct(xs []float64, p int) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

func unloadAll(b *testing.B, m *manager.Manager) {
	for _, st := range m.View().Models {
		if st.State != manager.Stopped && st.State != manager.Failed {
			m.Unload(st.Name)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		stopped := true
		for _, st := range m.View().Models {
			stopped = stopped && (st.State == manager.Stopped || st.State == manager.Failed)
		}
		if stopped {
			return
		}
		if time.Now().After(deadline) {
			b.Fatal("models did not stop")
		}
		time.Sleep(time.Millisecond) // polling interval
	}
}

// rawStart is the backend's own start, without vgw: a fake vLLM process
// started and polled for health every millisecond.
func rawStart(b *testing.B) time.Duration {
	d, _ := rawFake(b, false)
	return d
}

// rawStop is the backend's own graceful stop: SIGTERM until it has exited.
func rawStop(b *testing.B) time.Duration {
	_, d := rawFake(b, true)
	return d
}

func rawFake(b *testing.B, stop bool) (time.Duration, time.Duration) {
	exe, _ := os.Executable()
	start := time.Now()
	cmd := exec.Command(exe, "fakevllm", "--model", "raw", "--port", "0", "--startup-delay", startupDelay.String())
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	var line struct{ Addr string }
	if err := json.NewDecoder(out).Decode(&line); err != nil {
		b.Fatal(err)
	}
	for {
		resp, err := http.Get("http://" + line.Addr + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		time.Sleep(time.Millisecond) // the tightest practical poll
	}
	started := time.Since(start)
	t := time.Now()
	cmd.Process.Signal(os.Interrupt)
	cmd.Wait()
	stopped := time.Since(t)
	if !stop {
		stopped = 0
	}
	return started, stopped
}

// BenchmarkDockerColdStart times a request for a cold model with the
// Docker runtime, as BenchmarkColdStart does with the sim runtime: from
// the first ext_proc message to the routed answer, the container created,
// started and found healthy on its network. The baseline, measured in the
// same run, is Docker's own: the same container created and started
// through the API and polled for health every millisecond.
func BenchmarkDockerColdStart(b *testing.B) {
	e := dockertest.Need(b)
	instance := e.Instance(b)
	s := startStack(b, fmt.Sprintf(`
runtime: {kind: docker, image: %s, network: %s, instance: %s}
load_timeout: 30s
drain_timeout: 5s
min_resident: 0s
gpus: [{name: g0, memory: 80GiB}]
models:
  a: {repo: org/a, vram: 60GiB, env: {FAKEVLLM_STARTUP_DELAY: 100ms}}
`, e.Image, e.Network, instance))
	coldStarts(b, s, func() time.Duration { return rawContainer(b, e) })
}

// rawContainer is Docker's own start of the fake's container, without vgw.
func rawContainer(b *testing.B, e *dockertest.Engine) time.Duration {
	ctx := context.Background()
	start := time.Now()
	c, err := e.Client.ContainerCreate(ctx, client.ContainerCreateOptions{
		Config: &container.Config{Image: e.Image, Cmd: []string{"--model", "raw", "--host", "0.0.0.0", "--port", "8000"},
			Env: []string{"FAKEVLLM_STARTUP_DELAY=" + startupDelay.String()}},
		NetworkingConfig: &network.NetworkingConfig{EndpointsConfig: map[string]*network.EndpointSettings{e.Network: {}}},
	})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Client.ContainerRemove(ctx, c.ID, client.ContainerRemoveOptions{Force: true})
	if _, err := e.Client.ContainerStart(ctx, c.ID, client.ContainerStartOptions{}); err != nil {
		b.Fatal(err)
	}
	in, err := e.Client.ContainerInspect(ctx, c.ID, client.ContainerInspectOptions{})
	if err != nil {
		b.Fatal(err)
	}
	addr := in.Container.NetworkSettings.Networks[e.Network].IPAddress.String() + ":8000"
	for {
		resp, err := http.Get("http://" + addr + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return time.Since(start)
			}
		}
		time.Sleep(time.Millisecond) // the tightest practical poll
	}
}
