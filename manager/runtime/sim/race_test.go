package sim_test

import (
	"context"
	"fmt"
	"maps"
	"math/rand"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/manager/managertest"
	"github.com/vgw-project/vgw/manager/runtime"
	"github.com/vgw-project/vgw/manager/runtime/sim"
)

// startWrapped is startManager with the counting runtime wrapped by wrap,
// for a test that changes how the runtime answers.
func startWrapped(t *testing.T, yaml string, wrap func(rt *countingRuntime) manager.Runtime) *testManager {
	t.Helper()
	var rt *countingRuntime
	tm := startManagerWith(t, yaml, nil, func(r manager.Runtime) manager.Runtime {
		rt = &countingRuntime{Runtime: r.(*sim.Runtime), starts: map[string]int{}, pids: map[string]int{}}
		return wrap(rt)
	}, manager.Options{})
	tm.rt = rt
	return tm
}

// awakeCount is how many models are loading, ready or waking.
func (tm *testManager) awakeCount() (n int, states map[string]manager.State) {
	states = map[string]manager.State{}
	for _, mv := range tm.View().Models {
		states[mv.Name] = mv.State
		if mv.State == manager.Ready || mv.State == manager.Loading || mv.State == manager.Waking {
			n++
		}
	}
	return n, states
}

// TestMaxModelsWhileWaking: a waking model counts against max_models,
// so no other model is placed beside it past the cap.
func TestMaxModelsWhileWaking(t *testing.T) {
	tm := startManager(t, sleepSetup{}.config()+`max_models: 1
models:
  a: {vram: 20GiB, sim: {sleep_delay: 10ms, wake_delay: 2s, residual_vram: 1GiB}}
  b: {vram: 20GiB, sim: {sleep_delay: 10ms, wake_delay: 20ms, residual_vram: 1GiB}}
  c: {vram: 20GiB, sim: {sleep_delay: 10ms, wake_delay: 20ms, residual_vram: 1GiB}}
`)
	for _, m := range []string{"a", "b"} {
		if err := tm.ensure(m); err != nil {
			t.Fatal(err)
		}
	}
	if st := tm.status("a"); st.State != manager.Sleeping {
		t.Fatalf("a is %v, want asleep (max_models 1)", st.State)
	}
	a := tm.leaseLater("a") // wakes a, putting b to sleep
	poll.Until(t, "a waking, b asleep", func() bool {
		return tm.status("a").State == manager.Waking && tm.status("b").State == manager.Sleeping
	})
	c := tm.leaseLater("c")
	var worst int
	var seen map[string]manager.State
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if n, st := tm.awakeCount(); n > worst {
			worst, seen = n, st
		}
		time.Sleep(5 * time.Millisecond)
	}
	if worst > 1 {
		t.Errorf("%d models awake at once with max_models 1: %v", worst, seen)
	}
	for _, ch := range []<-chan leased{a, c} {
		if l := <-ch; l.err == nil {
			l.Release()
		}
	}
	if n, st := tm.awakeCount(); n > 1 {
		t.Errorf("in the end %d models awake with max_models 1: %v", n, st)
	}
}

// TestVRAMChangedWhileAsleep: a sleeper is woken with the footprint its
// server was started with, not one worked out from a config changed
// meanwhile, so the GPU is not overcommitted when it takes it back.
func TestVRAMChangedWhileAsleep(t *testing.T) {
	head := sleepSetup{}.config() + "models:\n"
	tm := startManager(t, head+sleepyModel("a", "60GiB")+sleepyModel("b", "55GiB"))
	if err := tm.ensure("a"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), poll.Long)
	defer cancel()
	if err := tm.Sleep(ctx, "a", true); err != nil {
		t.Fatal(err)
	}
	if err := tm.Update(managertest.Config(t, head+sleepyModel("a", "30GiB")+sleepyModel("b", "55GiB"))); err != nil {
		t.Fatal(err)
	}
	if err := tm.ensure("a"); err != nil { // woken: its server takes its 60 GiB back
		t.Fatal(err)
	}
	if n := tm.rt.count("a"); n != 1 {
		t.Logf("a started %d times", n)
	}
	if err := tm.ensure("b"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if used := tm.used(t); used > 90<<30 {
		t.Errorf("the 90 GiB GPU is charged %d GiB: a %v (ledger %d GiB), b %v", used>>30,
			tm.status("a").State, tm.status("a").PerGPU>>30, tm.status("b").State)
	}
}

// TestEvictedModelWokenFirst: when a model put to sleep to make room for
// another is woken before that other has started, the other gives up its
// placement and is placed afresh, rather than wait for ever.
func TestEvictedModelWokenFirst(t *testing.T) {
	tm := startManager(t, sleepSetup{hostMemory: "200GiB", twoGPUs: true}.config()+`models:
  a: {vram: 40GiB, gpus: [0], sim: {sleep_delay: 10ms, wake_delay: 20ms, residual_vram: 1GiB}}
  b: {vram: 30GiB, gpus: [0], sim: {sleep_delay: 10ms, wake_delay: 20ms, residual_vram: 1GiB}}
  d: {vram: 20GiB, gpus: [1], sim: {startup_delay: 2s}}
  c: {vram: 90GiB, tensor_parallel_size: 2, sim: {sleep_delay: 10ms, wake_delay: 20ms, residual_vram: 1GiB}}
`)
	for _, m := range []string{"a", "b"} {
		if err := tm.ensure(m); err != nil {
			t.Fatal(err)
		}
	}
	d := tm.leaseLater("d") // loading on GPU 1 for 2 s
	poll.Until(t, "d loading", func() bool { return tm.status("d").State == manager.Loading && tm.status("d").Instance != "" })
	c := tm.ensureWithin("c", 15*time.Second)
	poll.Until(t, "a asleep for c", func() bool { return tm.status("a").State == manager.Sleeping })
	if err := tm.ensure("a"); err != nil { // woken, b put to sleep for it
		t.Fatal(err)
	}
	if l := <-d; l.err == nil {
		l.Release()
	}
	if err := <-c; err != nil {
		t.Errorf("c never started: %v; c %v, a %v, b %v, d %v; events %v", err, tm.status("c").State, tm.status("a").State,
			tm.status("b").State, tm.status("d").State, tm.allEvents())
	}
}

// ensureWithin leases model on a goroutine of its own and gives the
// lease back at once: why it was not ready within d comes on the channel.
func (tm *testManager) ensureWithin(model string, d time.Duration) <-chan error {
	c := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), d)
		defer cancel()
		l, err := tm.Lease(ctx, model)
		if err == nil {
			l.Release()
		}
		c <- err
	}()
	return c
}

// hostHook runs before a sleeping server's host memory is read.
type hostHook struct {
	*countingRuntime
	before func(inst *runtime.Instance)
	extra  uint64 // added to what is read, as a container's baseline
}

func (h hostHook) HostMemory(ctx context.Context, inst *runtime.Instance) (uint64, error) {
	h.before(inst)
	n, err := h.countingRuntime.HostMemory(ctx, inst)
	return n + h.extra, err
}

// TestDiesAsItFallsAsleep: a server that dies once asleep but before the
// manager has taken its sleep (its exit comes while it is draining) is
// stopped, not taken for a sleeper holding memory on a server that is
// gone.
func TestDiesAsItFallsAsleep(t *testing.T) {
	var armed atomic.Bool
	tm := startWrapped(t, sleepSetup{}.config()+"models:\n"+sleepyModel("a", "40GiB"), func(rt *countingRuntime) manager.Runtime {
		return hostHook{rt, func(inst *runtime.Instance) {
			if !armed.CompareAndSwap(true, false) {
				return
			}
			syscall.Kill(inst.PIDs[0], syscall.SIGKILL)
			// Until it is reaped and its exit taken by the loop.
			for {
				if _, err := rt.Runtime.HostMemory(context.Background(), inst); err != nil {
					break
				}
				time.Sleep(time.Millisecond)
			}
			time.Sleep(100 * time.Millisecond)
		}, 0}
	})
	if err := tm.ensure("a"); err != nil {
		t.Fatal(err)
	}
	armed.Store(true)
	if err := tm.Sleep(context.Background(), "a", false); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	st := tm.status("a")
	if st.State != manager.Stopped {
		t.Errorf("a is %v on a server that is gone (host memory %d GiB in the view, %d charged); events %v",
			st.State, tm.View().HostUsed>>30, tm.rt.Host()>>30, tm.eventKinds("a"))
	}
}

// TestEvictedModelReloadedFirstSleepOff: the same with sleep off: an
// evicted model loaded again before the one it made room for started.
func TestEvictedModelReloadedFirstSleepOff(t *testing.T) {
	tm := startManager(t, `
runtime: {kind: sim}
load_timeout: 1m
drain_timeout: 2s
min_resident: 0s
inactivity_timeout: 0s
gpus:
  - {name: sim0, memory: 90GiB}
  - {name: sim1, memory: 90GiB}
models:
  a: {vram: 40GiB, gpus: [0]}
  b: {vram: 30GiB, gpus: [0]}
  d: {vram: 20GiB, gpus: [1], sim: {startup_delay: 2s}}
  c: {vram: 90GiB, tensor_parallel_size: 2}
`)
	for _, m := range []string{"a", "b"} {
		if err := tm.ensure(m); err != nil {
			t.Fatal(err)
		}
	}
	d := tm.leaseLater("d")
	poll.Until(t, "d loading", func() bool { return tm.status("d").State == manager.Loading && tm.status("d").Instance != "" })
	c := tm.ensureWithin("c", 15*time.Second)
	poll.Until(t, "a stopped for c", func() bool { return tm.status("a").State == manager.Stopped && tm.status("c").State == manager.Loading })
	if err := tm.ensure("a"); err != nil {
		t.Fatal(err)
	}
	if l := <-d; l.err == nil {
		l.Release()
	}
	if err := <-c; err != nil {
		t.Errorf("c never started: %v; c %v, a %v, b %v, d %v; events %v", err, tm.status("c").State, tm.status("a").State,
			tm.status("b").State, tm.status("d").State, tm.allEvents())
	}
}

// slowStop is a runtime whose stops take a while, as vLLM's do.
type slowStop struct {
	*countingRuntime
	d time.Duration
}

func (s slowStop) Stop(ctx context.Context, inst *runtime.Instance, grace time.Duration) error {
	time.Sleep(s.d)
	return s.countingRuntime.Stop(ctx, inst, grace)
}

// TestHostUncountedWhileSleepThenStop: a model unloaded as it falls
// asleep sleeps, then stops; meanwhile its host memory stays counted, so
// no other model is put to sleep in it past host_memory.
func TestHostUncountedWhileSleepThenStop(t *testing.T) {
	tm := startWrapped(t, sleepSetup{hostMemory: "50GiB", twoGPUs: true}.config()+`models:
  a: {vram: 40GiB, gpus: [0], sim: {sleep_delay: 500ms, wake_delay: 20ms, residual_vram: 1GiB}}
  b: {vram: 40GiB, gpus: [1], sim: {sleep_delay: 10ms, wake_delay: 20ms, residual_vram: 1GiB}}
`, func(rt *countingRuntime) manager.Runtime {
		return slowStop{rt, time.Second}
	})
	for _, m := range []string{"a", "b"} {
		if err := tm.ensure(m); err != nil {
			t.Fatal(err)
		}
	}
	if err := tm.Sleep(context.Background(), "a", false); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if err := tm.Unload("a"); err != nil { // a's sleep goes on; a stop follows
		t.Fatal(err)
	}
	if err := tm.Sleep(context.Background(), "b", false); err != nil {
		t.Logf("b's sleep refused: %v", err)
	}
	var worst uint64
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		worst = max(worst, tm.rt.Host())
		time.Sleep(2 * time.Millisecond)
	}
	if worst > 50<<30 {
		t.Errorf("the fakes held %d GiB of host memory at once, host_memory 50GiB", worst>>30)
	}
}

// stress runs clients against models for d, with ops (if set) run now
// and then; it checks, all along, that the GPU and host memory the fakes
// are charged stay within the GPU and host_memory, and at the end that
// no fake crashed or runs for no model.
func stress(t *testing.T, tm *testManager, models []string, gpuTotal, hostBudget uint64, d time.Duration, ops func(rng *rand.Rand)) {
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var fails, oks atomic.Int64
	var errMu sync.Mutex
	errs := map[string]int{}
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed))
			for {
				select {
				case <-stop:
					return
				default:
				}
				m := models[rng.Intn(len(models))]
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				l, err := tm.Lease(ctx, m)
				cancel()
				if err != nil {
					fails.Add(1)
					errMu.Lock()
					errs[err.Error()[:min(60, len(err.Error()))]]++
					errMu.Unlock()
					continue
				}
				if code := managertest.Chat(l.Endpoint(), m); code != 200 {
					errMu.Lock()
					errs[fmt.Sprintf("%s answered %d", m, code)]++
					errMu.Unlock()
				}
				time.Sleep(time.Duration(rng.Intn(30)) * time.Millisecond)
				l.Release()
				oks.Add(1)
				time.Sleep(time.Duration(rng.Intn(50)) * time.Millisecond)
			}
		}(int64(i))
	}
	if ops != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(99))
			for {
				select {
				case <-stop:
					return
				case <-time.After(time.Duration(50+rng.Intn(200)) * time.Millisecond):
					ops(rng)
				}
			}
		}()
	}
	var worstGPU, worstHost uint64
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		h := tm.rt.Host()
		if h > hostBudget && h > worstHost {
			v := tm.View()
			var b strings.Builder
			for _, mv := range v.Models {
				fmt.Fprintf(&b, " %s:%v/host%d", mv.Name, mv.State, mv.HostMemory>>30)
			}
			t.Logf("host charged %d GiB, view %d:%s", h>>30, v.HostUsed>>30, b.String())
		}
		worstGPU, worstHost = max(worstGPU, tm.used(t)), max(worstHost, h)
		time.Sleep(2 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("%d leases, %d failed: %v", oks.Load(), fails.Load(), errs)
	if worstGPU > gpuTotal {
		t.Errorf("GPU charged %d GiB at worst, of %d", worstGPU>>30, gpuTotal>>30)
	}
	if worstHost > hostBudget {
		t.Errorf("host charged %d GiB at worst, budget %d", worstHost>>30, hostBudget>>30)
	}
	for _, m := range models {
		for _, k := range tm.eventKinds(m) {
			if k == manager.EventCrashed || k == manager.EventWakeFailed || k == manager.EventLoadFailed {
				t.Errorf("%s: event %s; events %v", m, k, tm.eventKinds(m))
				break
			}
		}
	}
	// Settled: no model between states for good, and every fake alive is
	// some model's server.
	var between string
	poll.Within(t, 10*time.Second, "no model between states after the clients stopped", func() bool {
		between = ""
		for _, mv := range tm.View().Models {
			if mv.State == manager.Loading || mv.State == manager.Waking || mv.State == manager.Draining {
				between = mv.Name + " " + mv.State.String()
			}
		}
		return between == ""
	})
	owned := map[string]bool{}
	for _, mv := range tm.View().Models {
		if mv.Instance != "" {
			owned[mv.Instance] = true
		}
	}
	tm.rt.mu.Lock()
	pids := maps.Clone(tm.rt.pids)
	tm.rt.mu.Unlock()
	for inst, pid := range pids {
		if syscall.Kill(pid, 0) == nil && !owned[inst] {
			t.Errorf("fake %s (pid %d) runs for no model", inst, pid)
		}
	}
	v := tm.View()
	if v.HostUsed != tm.rt.Host() {
		t.Errorf("view host %d GiB, charged %d GiB", v.HostUsed>>30, tm.rt.Host()>>30)
	}
}

func stressConfig(extra string) string {
	return `
runtime: {kind: sim}
load_timeout: 10s
drain_timeout: 200ms
min_resident: 0s
inactivity_timeout: 0s
sleep: level1
host_memory: 80GiB
` + extra + `
gpus:
  - {name: sim0, memory: 90GiB}
models:
  a: {vram: 40GiB, sim: {sleep_delay: 15ms, wake_delay: 25ms, residual_vram: 1GiB, startup_delay: 50ms}}
  b: {vram: 40GiB, sim: {sleep_delay: 15ms, wake_delay: 25ms, residual_vram: 1GiB, startup_delay: 50ms}}
  c: {vram: 40GiB, sim: {sleep_delay: 15ms, wake_delay: 25ms, residual_vram: 1GiB, startup_delay: 50ms}}
  d: {vram: 20GiB, sleep: level2, sim: {sleep_delay: 15ms, wake_delay: 25ms, residual_vram: 1GiB, startup_delay: 50ms}}
`
}

// TestSleepStressRequests: clients cycling through four models on one GPU
// never take its memory or host memory past their bounds, and nothing is
// left between states or running for no model (see stress).
func TestSleepStressRequests(t *testing.T) {
	tm := startManager(t, stressConfig(""))
	stress(t, tm, []string{"a", "b", "c", "d"}, 90<<30, 80<<30, 3*time.Second, nil)
}

// TestSleepStressMaxModels: the same with max_models 1.
func TestSleepStressMaxModels(t *testing.T) {
	tm := startManager(t, stressConfig("max_models: 1"))
	stress(t, tm, []string{"a", "b", "c", "d"}, 90<<30, 80<<30, 3*time.Second, nil)
}

// TestSleepStressOperators: the same with an operator sleeping, waking,
// pinning and loading models at random meanwhile.
func TestSleepStressOperators(t *testing.T) {
	tm := startManager(t, stressConfig(""))
	models := []string{"a", "b", "c", "d"}
	stress(t, tm, models, 90<<30, 80<<30, 3*time.Second, func(rng *rand.Rand) {
		m := models[rng.Intn(len(models))]
		switch rng.Intn(4) {
		case 0:
			tm.Sleep(context.Background(), m, false)
		case 1:
			tm.Wake(context.Background(), m, false)
		case 2:
			tm.Pin(m, rng.Intn(2) == 0)
		case 3:
			tm.Load(context.Background(), m, false)
		}
	})
}

// TestSleepStressSleepOff: the same with sleep off.
func TestSleepStressSleepOff(t *testing.T) {
	tm := startManager(t, strings.Replace(stressConfig(""), "sleep: level1", "sleep: off", 1))
	stress(t, tm, []string{"a", "b", "c", "d"}, 90<<30, 80<<30, 3*time.Second, nil)
}

// TestSleepBeforeHostRoomIsMade: a model put to sleep in the host memory
// of an older sleeper being stopped falls asleep only once that sleeper
// has stopped (seconds, for vLLM), so the two never hold host memory
// past host_memory together.
func TestSleepBeforeHostRoomIsMade(t *testing.T) {
	tm := startWrapped(t, sleepSetup{hostMemory: "50GiB", twoGPUs: true}.config()+"models:\n"+
		"  s: {vram: 40GiB, gpus: [1], sim: {sleep_delay: 10ms, wake_delay: 20ms, residual_vram: 1GiB}}\n"+
		"  a: {vram: 40GiB, gpus: [0], sim: {sleep_delay: 10ms, wake_delay: 20ms, residual_vram: 1GiB}}\n",
		func(rt *countingRuntime) manager.Runtime { return slowStop{rt, slowStopDelay} })
	ctx, cancel := context.WithTimeout(context.Background(), poll.Long)
	defer cancel()
	if err := tm.ensure("s"); err != nil {
		t.Fatal(err)
	}
	if err := tm.Sleep(ctx, "s", true); err != nil {
		t.Fatal(err)
	}
	if err := tm.ensure("a"); err != nil {
		t.Fatal(err)
	}
	if err := tm.Sleep(context.Background(), "a", false); err != nil { // stops s for room
		t.Fatal(err)
	}
	var worst uint64
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(2 * time.Millisecond) {
		worst = max(worst, tm.rt.Host())
	}
	if st := tm.status("a"); st.State != manager.Sleeping {
		t.Errorf("stop delay %v: a is %v, want asleep in the room s gave back; events %v", slowStopDelay, st.State, tm.allEvents())
	}
	if worst > 50<<30 {
		t.Errorf("stop delay %v: the fakes held %d GiB of host memory at once, host_memory 50GiB; a %v, s %v", slowStopDelay, worst>>30, tm.status("a").State, tm.status("s").State)
	}
}

// slowStopDelay is how long a stop takes in TestSleepBeforeHostRoomIsMade.
var slowStopDelay = time.Second

// TestSleepBeforeHostRoomIsMadeFastStop: the same with stops that take
// no time.
func TestSleepBeforeHostRoomIsMadeFastStop(t *testing.T) {
	slowStopDelay = 0
	defer func() { slowStopDelay = time.Second }()
	TestSleepBeforeHostRoomIsMade(t)
}

// noOrphans checks that every live fake is some model's server.
func (tm *testManager) noOrphans(t *testing.T) {
	t.Helper()
	owned := map[string]bool{}
	for _, mv := range tm.View().Models {
		if mv.Instance != "" {
			owned[mv.Instance] = true
		}
	}
	tm.rt.mu.Lock()
	pids := maps.Clone(tm.rt.pids)
	tm.rt.mu.Unlock()
	for inst, pid := range pids {
		if syscall.Kill(pid, 0) == nil && !owned[inst] {
			var ws syscall.WaitStatus
			t.Errorf("fake %s (pid %d) runs for no model %v", inst, pid, ws)
		}
	}
}

// TestKilledWhileWaking: a server killed as it wakes is started again
// cold for the request that woke it, and no fake is left running for no
// model.
func TestKilledWhileWaking(t *testing.T) {
	tm := startManager(t, sleepSetup{hostMemory: "200GiB"}.config()+"models:\n"+
		"  a: {vram: 60GiB, sim: {sleep_delay: 10ms, wake_delay: 1s, residual_vram: 1GiB}}\n"+sleepyModel("b", "60GiB"))
	for _, m := range []string{"a", "b"} {
		if err := tm.ensure(m); err != nil {
			t.Fatal(err)
		}
	}
	inst := tm.status("a").Instance
	a := tm.leaseLater("a")
	pollFor(t, tm, 5*time.Second, "a waking", func() bool { return tm.status("a").State == manager.Waking && tm.status("b").State == manager.Sleeping })
	time.Sleep(100 * time.Millisecond)
	syscall.Kill(tm.rt.pid(t, inst), syscall.SIGKILL)
	l := <-a
	if l.err != nil {
		t.Fatalf("a: %v; events %v", l.err, tm.allEvents())
	}
	l.Release()
	time.Sleep(300 * time.Millisecond)
	tm.noOrphans(t)
	if u := tm.used(t); u > 90<<30 {
		t.Errorf("GPU charged %d GiB", u>>30)
	}
	t.Logf("events %v", tm.allEvents())
}

// TestUnloadWhileWaitingToWake: a model unloaded while its wake waits for
// a neighbour to fall asleep answers its waiter that it was unloaded, and
// stops; its host memory leaves the ledger with it.
func TestUnloadWhileWaitingToWake(t *testing.T) {
	tm := startManager(t, sleepSetup{hostMemory: "200GiB"}.config()+"models:\n"+sleepyModel("a", "60GiB")+
		"  b: {vram: 60GiB, sim: {sleep_delay: 1s, wake_delay: 20ms, residual_vram: 1GiB}}\n")
	for _, m := range []string{"a", "b"} {
		if err := tm.ensure(m); err != nil {
			t.Fatal(err)
		}
	}
	a := tm.leaseLater("a") // waits for b's 1 s sleep
	poll.Until(t, "a waking, b draining", func() bool {
		return tm.status("a").State == manager.Waking && tm.status("b").State == manager.Draining
	})
	if err := tm.Unload("a"); err != nil {
		t.Fatal(err)
	}
	if l := <-a; l.err == nil {
		t.Errorf("a leased after its unload")
		l.Release()
	} else {
		t.Logf("a: %v", l.err)
	}
	pollFor(t, tm, 5*time.Second, "a stopped, b asleep", func() bool {
		return tm.status("a").State == manager.Stopped && tm.status("b").State == manager.Sleeping
	})
	time.Sleep(300 * time.Millisecond)
	tm.noOrphans(t)
	if v := tm.View(); v.HostUsed != tm.rt.Host() {
		t.Errorf("host view %d charged %d", v.HostUsed>>30, tm.rt.Host()>>30)
	}
	if err := tm.ensure("a"); err != nil {
		t.Fatal(err)
	}
}

// TestStoppedWhileFallingAsleep: a server that hangs (SIGSTOP) as it falls
// asleep is stopped once its sleep times out, and the model that needed
// its room loads.
func TestStoppedWhileFallingAsleep(t *testing.T) {
	tm := startManager(t, sleepSetup{hostMemory: "100GiB", loadTimeout: "1s"}.config()+"models:\n"+
		"  a: {vram: 60GiB, sim: {sleep_delay: 300ms, wake_delay: 20ms, residual_vram: 1GiB}}\n"+sleepyModel("b", "60GiB"))
	if err := tm.ensure("a"); err != nil {
		t.Fatal(err)
	}
	inst := tm.status("a").Instance
	b := tm.leaseLater("b")
	poll.Until(t, "a draining", func() bool { return tm.status("a").State == manager.Draining })
	syscall.Kill(tm.rt.pid(t, inst), syscall.SIGSTOP)
	l := <-b
	if l.err != nil {
		t.Fatalf("b: %v; events %v", l.err, tm.allEvents())
	}
	l.Release()
	if st := tm.status("a"); st.State != manager.Stopped {
		t.Errorf("a is %v", st.State)
	}
	time.Sleep(300 * time.Millisecond)
	tm.noOrphans(t)
	if err := tm.ensure("a"); err != nil {
		t.Fatal(err)
	}
	t.Logf("events %v", tm.allEvents())
}

func pollFor(t *testing.T, tm *testManager, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(2 * time.Millisecond) {
		if cond() {
			return
		}
	}
	var b strings.Builder
	for _, mv := range tm.View().Models {
		fmt.Fprintf(&b, " %s:%v", mv.Name, mv.State)
	}
	t.Fatalf("not %s:%s; events %v", what, b.String(), tm.allEvents())
}

// TestLevel2WithNoHostBudget: with host_memory 0, a level-2 sleeper
// stays asleep though its runtime reads its server's memory as its
// container's (docker stats: GiBs for vLLM's Python process): what it
// holds asleep is what sleeping added.
func TestLevel2WithNoHostBudget(t *testing.T) {
	tm := startWrapped(t, sleepSetup{hostMemory: "0", sleep: "level2"}.config()+"models:\n"+sleepyModel("a", "60GiB")+sleepyModel("b", "60GiB"), func(rt *countingRuntime) manager.Runtime {
		return hostHook{rt, func(*runtime.Instance) {}, 8 << 20}
	})
	for _, m := range []string{"a", "b"} {
		if err := tm.ensure(m); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(500 * time.Millisecond)
	if st := tm.status("a"); st.State != manager.Sleeping {
		t.Errorf("a is %v, want asleep at level 2; events %v", st.State, tm.eventKinds("a"))
	}
}
