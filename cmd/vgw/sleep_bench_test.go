package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vgw-project/vgw/manager/runtime/vllm"
)

// The sleep tier's benchmarks (issue 16), on the sim runtime with fake
// backends that take the time vLLM 0.11 takes (the vLLM blog's "sleep
// mode" post, A100), scaled down 40 times so that a run takes a minute:
// a cold start of 40 s becomes 1 s, a level-1 wake of 3 s 75 ms, a fall
// asleep of 1 s 25 ms. The ratios the targets are stated in do not
// depend on the scale; vgw's own overhead, measured in milliseconds,
// does not scale, which makes the ratios here harder to meet, not easier.
const (
	benchCold  = time.Second
	benchWake  = 75 * time.Millisecond
	benchSleep = 25 * time.Millisecond
)

// sleepBenchConfig is a config of one 80 GiB GPU with models that each
// take 60 GiB, so that one fits at a time, at sleep level (off, level1).
func sleepBenchConfig(sleep string, models ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `
runtime: {kind: sim}
load_timeout: 30s
drain_timeout: 5s
min_resident: 0s
inactivity_timeout: 0s
sleep: %s
host_memory: 1TiB
gpus: [{name: sim0, memory: 80GiB}]
models:
`, sleep)
	for _, m := range models {
		fmt.Fprintf(&b, "  %s: {vram: 60GiB, sim: {startup_delay: %v, sleep_delay: %v, wake_delay: %v, residual_vram: 1300MiB}}\n",
			m, benchCold, benchSleep, benchWake)
	}
	return b.String()
}

// BenchmarkWake times a request for a sleeping model, from its first
// ext_proc message to its routed answer: the wake, the health check, the
// xDS update and its ACK. The baseline, measured in the same run, is the
// backend's own wake: a fake vLLM asleep at level 1, woken directly and
// found healthy. The target: vgw's overhead beyond it at most 10 ms at
// the median and 50 ms at p99.
func BenchmarkWake(b *testing.B) {
	s := startStack(b, sleepBenchConfig("level1", "a"))
	if r := s.ask(b, "a"); r.Status != 200 {
		b.Fatalf("a: %d %q", r.Status, r.Body)
	}
	raw := startRawSleeper(b)
	ctx := context.Background()
	var total, raws []time.Duration
	for b.Loop() {
		b.StopTimer()
		if err := s.mgr.Sleep(ctx, "a", true); err != nil {
			b.Fatal(err)
		}
		raws = append(raws, raw.wake(b))
		b.StartTimer()
		start := time.Now()
		if r := s.ask(b, "a"); r.Status != 200 {
			b.Fatalf("a: %d %q", r.Status, r.Body)
		}
		total = append(total, time.Since(start))
	}
	over := make([]float64, len(total))
	rs := make([]float64, len(total))
	for i := range total {
		over[i] = float64(total[i]-raws[i]) / float64(time.Millisecond)
		rs[i] = float64(raws[i]) / float64(time.Millisecond)
	}
	b.ReportMetric(pct(over, 50), "wake-over-raw-p50-ms")
	b.ReportMetric(pct(over, 99), "wake-over-raw-p99-ms")
	b.ReportMetric(pct(rs, 50), "raw-wake-p50-ms")
}

// rawSleeper is a fake vLLM in sleep mode, run without vgw.
type rawSleeper struct{ addr string }

func startRawSleeper(b *testing.B) *rawSleeper {
	exe, _ := os.Executable()
	cmd := exec.Command(exe, "fakevllm", "--model", "raw", "--port", "0", "--enable-sleep-mode",
		"--sleep-delay", benchSleep.String(), "--wake-delay", benchWake.String())
	cmd.Env = append(os.Environ(), "VLLM_SERVER_DEV_MODE=1")
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	var line struct{ Addr string }
	if err := json.NewDecoder(out).Decode(&line); err != nil {
		b.Fatal(err)
	}
	return &rawSleeper{addr: line.Addr}
}

// wake puts the fake to sleep at level 1, then times its wake: vLLM's
// wake-up and the check that it is awake, and one health check.
func (r *rawSleeper) wake(b *testing.B) time.Duration {
	ctx := context.Background()
	if err := vllm.Sleep(ctx, http.DefaultClient, r.addr, 1); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	if err := vllm.Wake(ctx, http.DefaultClient, r.addr, 1); err != nil {
		b.Fatal(err)
	}
	resp, err := http.Get("http://" + r.addr + "/health")
	if err != nil || resp.StatusCode != 200 {
		b.Fatalf("health after the wake: %v %v", resp, err)
	}
	resp.Body.Close()
	return time.Since(start)
}

// BenchmarkSleepCycle runs workloads that cycle through more models than
// fit on the GPU, once with the sleep tier (level 1) and once with sleep
// off, in the same run, and reports the ratio of their times. The target:
// at most 1/3.
//
//   - five-switch: the vLLM blog's pattern, two models each filling the
//     GPU, both loaded once, then five switches between them;
//   - random: four models, 40 requests in an order drawn from a seeded
//     source, from a machine with nothing loaded.
func BenchmarkSleepCycle(b *testing.B) {
	workloads := []struct {
		name   string
		models []string
		warm   []string // loaded before the clock starts
		seq    func() []string
	}{
		{"five-switch", []string{"a", "b"}, []string{"a", "b"}, func() []string { return []string{"a", "b", "a", "b", "a"} }},
		{"random", []string{"a", "b", "c", "d"}, nil, func() []string {
			r := rand.New(rand.NewPCG(16, 1))
			seq := make([]string, 40)
			for i := range seq {
				seq[i] = string(rune('a' + r.IntN(4)))
			}
			return seq
		}},
	}
	for _, w := range workloads {
		b.Run(w.name, func(b *testing.B) {
			on := startStack(b, sleepBenchConfig("level1", w.models...))
			off := startStack(b, sleepBenchConfig("off", w.models...))
			var onT, offT time.Duration
			for b.Loop() {
				for _, s := range []*stack{on, off} {
					b.StopTimer()
					unloadAll(b, s.mgr)
					for _, m := range w.warm {
						if r := s.ask(b, m); r.Status != 200 {
							b.Fatalf("%s: %d %q", m, r.Status, r.Body)
						}
					}
					b.StartTimer()
					start := time.Now()
					for _, m := range w.seq() {
						if r := s.ask(b, m); r.Status != 200 {
							b.Fatalf("%s: %d %q", m, r.Status, r.Body)
						}
					}
					if s == on {
						onT += time.Since(start)
					} else {
						offT += time.Since(start)
					}
				}
			}
			b.ReportMetric(onT.Seconds()/float64(b.N), "sleep-s/op")
			b.ReportMetric(offT.Seconds()/float64(b.N), "off-s/op")
			b.ReportMetric(float64(onT)/float64(offT), "sleep/off")
		})
	}
}
