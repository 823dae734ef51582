package sim_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"syscall"
	"testing"

	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager"
)

// TestSleepLedger: after any sequence of requests, sleeps, wakes,
// unloads and crashes, once the manager is at rest, what it counts
// matches what is alive: each GPU's memory is the sum of its awake
// models' footprints and its sleepers' residuals, the host memory it
// counts is what the sleeping fakes hold (and within host_memory), and
// every fake running is a model's. Each seed is one random sequence.
func TestSleepLedger(t *testing.T) {
	const config = `
runtime: {kind: sim}
load_timeout: 1m
drain_timeout: 2s
min_resident: 0s
inactivity_timeout: 0s
sleep: level1
host_memory: 100GiB
gpus:
  - {name: sim0, memory: 80GiB}
  - {name: sim1, memory: 80GiB}
models:
  a: {vram: 50GiB, sim: {sleep_delay: 5ms, wake_delay: 5ms, residual_vram: 1GiB}}
  b: {vram: 40GiB, sim: {sleep_delay: 5ms, wake_delay: 5ms, residual_vram: 2GiB}}
  c: {vram: 30GiB, sleep: level2, sim: {sleep_delay: 5ms, wake_delay: 5ms, residual_vram: 1GiB}}
  d: {vram: 60GiB, sim: {sleep_delay: 5ms, wake_delay: 5ms, residual_vram: 1GiB}}
  e: {vram: 30GiB, sleep: off}
  f: {vram: 40GiB, gpus: [1], sim: {sleep_delay: 5ms, wake_delay: 5ms, residual_vram: 1GiB}}
`
	models := []string{"a", "b", "c", "d", "e", "f"}
	seen := map[string]int{}
	for seed := range uint64(4) {
		t.Run(fmt.Sprint("seed ", seed), func(t *testing.T) {
			tm := startManager(t, config)
			r := rand.New(rand.NewPCG(seed, 16))
			var ops []string
			for range 40 {
				m := models[r.IntN(len(models))]
				switch op := r.IntN(10); {
				case op < 5:
					ops = append(ops, "ask "+m)
					if err := tm.ensure(m); err != nil {
						t.Fatalf("after %v: %v", ops, err)
					}
				case op < 7:
					ops = append(ops, "sleep "+m)
					tm.Sleep(context.Background(), m, false) // refused when it cannot: fine
				case op < 8:
					ops = append(ops, "wake "+m)
					tm.Wake(context.Background(), m, false)
				case op < 9:
					ops = append(ops, "unload "+m)
					tm.Unload(m)
				default:
					st := tm.status(m)
					if st.State != manager.Ready && st.State != manager.Sleeping {
						continue
					}
					ops = append(ops, "kill "+m)
					syscall.Kill(tm.rt.pid(t, st.Instance), syscall.SIGKILL)
				}
				var why string
				poll.Until(t, fmt.Sprintf("the ledger to match what is alive after %v (last: %s)", ops, func() string { return why }()), func() bool {
					why = tm.ledger()
					return why == ""
				})
			}
			for _, e := range tm.allEvents() {
				seen[e[strings.Index(e, "/")+1:]]++
			}
		})
	}
	// The sequences must have taken the tier through its paths, or the
	// ledger was checked for nothing.
	for _, kind := range []string{manager.EventSleeping, manager.EventWoken, manager.EventCrashed, manager.EventEvicted, manager.EventUnloaded} {
		if seen[kind] == 0 {
			t.Errorf("no %s event in any sequence: %v", kind, seen)
		}
	}
	t.Logf("events: %v", seen)
}

// ledger says how the manager's counts differ from what is alive, once
// no model is between states; "" when they agree.
func (tm *testManager) ledger() string {
	v := tm.View()
	want := make([]uint64, len(v.GPUs))
	running := 0
	var host uint64
	for _, m := range v.Models {
		switch m.State {
		case manager.Stopped, manager.Failed:
			continue
		case manager.Ready:
			for _, g := range m.GPUs {
				want[g] += m.PerGPU
			}
		case manager.Sleeping:
			for _, g := range m.GPUs {
				want[g] += m.Residual
			}
			host += m.HostMemory
		default:
			return fmt.Sprintf("%s is %v", m.Name, m.State)
		}
		running++
	}
	mem, _ := tm.gpus.Memory()
	for i, g := range mem {
		if g.Used != want[i] {
			return fmt.Sprintf("gpu%d: %d GiB charged, the models account for %d", i, g.Used>>30, want[i]>>30)
		}
	}
	switch {
	case v.HostUsed != host:
		return fmt.Sprintf("host memory: the view says %d, its sleepers %d", v.HostUsed, host)
	case tm.rt.Host() != host:
		return fmt.Sprintf("host memory: %d GiB charged, the sleepers account for %d", tm.rt.Host()>>30, host>>30)
	case host > v.HostBudget:
		return fmt.Sprintf("host memory %d GiB past its budget %d", host>>30, v.HostBudget>>30)
	case tm.rt.Live() != running:
		return fmt.Sprintf("%d fakes run for %d models", tm.rt.Live(), running)
	}
	return ""
}
