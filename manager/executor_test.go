package manager

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vgw-project/vgw/manager/gpu"
	"github.com/vgw-project/vgw/manager/managertest"
	"github.com/vgw-project/vgw/manager/runtime"
)

// The executor's tests run a whole Manager over a recording fake of a
// runtime: its servers are HTTP handlers in this process, so nothing is
// started but goroutines. The runtimes' own tests run real servers
// (manager/runtime/sim, manager/runtime/docker).

// fakeRuntime starts "servers" that are httptest servers answering
// /health with health's status, and records what it was asked.
type fakeRuntime struct {
	t      testing.TB
	health atomic.Int32 // the status /health answers
	exits  chan runtime.Exit
	// inFlight, when set, is read as each Stop begins: a server stopped
	// with requests in flight is a failure of the manager.
	inFlight func(model string) int64

	mu      sync.Mutex
	starts  map[string]int
	stopped []string
	servers map[string]*httptest.Server
}

func newFakeRuntime(t testing.TB) *fakeRuntime {
	f := &fakeRuntime{t: t, exits: make(chan runtime.Exit, 16), starts: map[string]int{}, servers: map[string]*httptest.Server{}}
	f.health.Store(http.StatusOK)
	return f
}

func (f *fakeRuntime) Start(ctx context.Context, spec runtime.Spec) (*runtime.Instance, error) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(int(f.health.Load()))
	}))
	f.t.Cleanup(srv.Close)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.starts[spec.Model]++
	id := spec.Model + "-" + strconv.Itoa(f.starts[spec.Model])
	f.servers[id] = srv
	var gpus []int
	for _, g := range spec.GPUs {
		gpus = append(gpus, g.Index)
	}
	return &runtime.Instance{ID: id, Model: spec.Model, Addr: strings.TrimPrefix(srv.URL, "http://"), GPUs: gpus,
		Signature: spec.Signature, Launch: spec.Launch}, nil
}

func (f *fakeRuntime) Stop(_ context.Context, inst *runtime.Instance, _ time.Duration) error {
	if f.inFlight != nil {
		if n := f.inFlight(inst.Model); n > 0 {
			f.t.Errorf("%s stopped with %d requests in flight", inst.ID, n)
		}
	}
	f.mu.Lock()
	f.stopped = append(f.stopped, inst.ID)
	f.mu.Unlock()
	return nil
}

func (f *fakeRuntime) Exits() <-chan runtime.Exit                         { return f.exits }
func (f *fakeRuntime) Adopt(context.Context) ([]*runtime.Instance, error) { return nil, nil }
func (f *fakeRuntime) PIDs(_ context.Context, inst *runtime.Instance) ([]int, error) {
	return inst.PIDs, nil
}

func (f *fakeRuntime) stops() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.stopped...)
}

var _ Runtime = (*fakeRuntime)(nil)

// runManager runs a Manager over rt until the test ends.
func runManager(t *testing.T, yaml string, rt Runtime) *Manager {
	t.Helper()
	m, _ := runManagerStop(t, yaml, rt)
	return m
}

// runManagerStop is runManager with a stop of the test's own, which
// returns once the loop has ended.
func runManagerStop(t *testing.T, yaml string, rt Runtime) (*Manager, func()) {
	t.Helper()
	cfg := managertest.Config(t, yaml)
	var gs []gpu.GPU
	for _, g := range cfg.GPUs.Declared {
		gs = append(gs, gpu.GPU{Name: g.Name, Total: uint64(g.Memory)})
	}
	m := New(cfg, rt, gpu.NewDeclared(gs), Options{Tick: 10 * time.Millisecond, GPUPoll: 10 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Run(ctx); close(done) }()
	stop := func() { cancel(); <-done }
	t.Cleanup(stop)
	return m, stop
}

// within bounds a wait for what must happen: only a hang reaches it.
func within(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// TestLeaseLoads: Lease loads a stopped model through the runtime and
// returns a lease on its server; TryLease then leases it at once; the
// View counts both until they are released.
func TestLeaseLoads(t *testing.T) {
	rt := newFakeRuntime(t)
	m := runManager(t, schedConfig+"models:\n  a: {vram: 20GiB}\n", rt)
	if _, ok := m.TryLease("a"); ok {
		t.Fatal("leased a stopped model")
	}
	l, err := m.Lease(within(t), "a")
	if err != nil {
		t.Fatal(err)
	}
	l2, ok := m.TryLease("a")
	if !ok || l2.Endpoint() != l.Endpoint() || l.Endpoint() == "" {
		t.Fatalf("TryLease once ready: %v at %q, want the lease's %q", ok, l2.Endpoint(), l.Endpoint())
	}
	v := m.View().Model("a")
	if v.State != Ready || v.Endpoint != l.Endpoint() || v.InFlight() != 2 {
		t.Fatalf("the View: %+v with %d in flight", v, v.InFlight())
	}
	l.Release()
	l2.Release()
	if n := m.View().Model("a").InFlight(); n != 0 {
		t.Fatalf("%d in flight once released", n)
	}
	if _, err := m.Lease(within(t), "nope"); !errors.Is(err, ErrUnknownModel) {
		t.Fatalf("an unknown model: %v", err)
	}
}

// TestFailedLoadStopsItsServer: a server that never answers its health
// check is stopped, and only then is the load's failure told.
func TestFailedLoadStopsItsServer(t *testing.T) {
	rt := newFakeRuntime(t)
	rt.health.Store(http.StatusServiceUnavailable)
	m := runManager(t, strings.Replace(schedConfig, "load_timeout: 1m", "load_timeout: 200ms", 1)+"models:\n  a: {vram: 20GiB}\n", rt)
	_, err := m.Lease(within(t), "a")
	var le *LoadError
	if !errors.As(err, &le) || !le.Timeout() {
		t.Fatalf("%v, want a load timeout", err)
	}
	if s := rt.stops(); len(s) != 1 || s[0] != "a-1" {
		t.Fatalf("stopped %v before the failure was told, want [a-1]", s)
	}
}

// TestNoStopWithRequestsInFlight: however requests and unloads interleave,
// a server is never stopped while a lease on it is held (before the drain
// timeout): TryLease counts and then reads the state, the scheduler
// publishes draining and then reads the count.
func TestNoStopWithRequestsInFlight(t *testing.T) {
	rt := newFakeRuntime(t)
	m := runManager(t, strings.Replace(schedConfig, "drain_timeout: 2s", "drain_timeout: 1h", 1)+"models:\n  a: {vram: 20GiB}\n", rt)
	// The leases held: counted from TryLease's success to just before
	// Release, so a lease that failed (counted in a moment, then out)
	// is not taken for one held.
	var held atomic.Int64
	rt.inFlight = func(string) int64 { return held.Load() }
	ctx := within(t)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if l, ok := m.TryLease("a"); ok {
					held.Add(1)
					held.Add(-1)
					l.Release()
				}
			}
		})
	}
	for range 8 {
		l, err := m.Lease(ctx, "a")
		if err != nil {
			t.Fatal(err)
		}
		l.Release()
		if err := m.Unload("a"); err != nil {
			t.Fatal(err)
		}
		for m.View().Model("a").State != Stopped {
			select {
			case <-m.View().Changed():
			case <-ctx.Done():
				t.Fatal("a never stopped")
			}
		}
	}
	close(stop)
	wg.Wait()
}

// TestCrashSeen: a server that exits while ready leaves the View at once.
func TestCrashSeen(t *testing.T) {
	rt := newFakeRuntime(t)
	m := runManager(t, schedConfig+"models:\n  a: {vram: 20GiB}\n", rt)
	l, err := m.Lease(within(t), "a")
	if err != nil {
		t.Fatal(err)
	}
	l.Release()
	v := m.View()
	rt.exits <- runtime.Exit{ID: "a-1", Model: "a", Code: 1, Reason: "exited"}
	ctx := within(t)
	for m.View().Model("a").State != Stopped {
		select {
		case <-v.Changed():
			v = m.View()
		case <-ctx.Done():
			t.Fatal("the crash was not seen")
		}
	}
}

// readyManager is a Manager with model a ready, without its loop: the
// request path's view of it.
func readyManager(t testing.TB) *Manager {
	t.Helper()
	cfg := managertest.Config(t, schedConfig+"models:\n  a: {vram: 20GiB}\n")
	m := New(cfg, newFakeRuntime(nil), gpu.NewDeclared([]gpu.GPU{{Name: "sim0", Total: 80 << 30}}), Options{})
	now := time.Now()
	w := &waiter{reply: make(chan reply, 1)}
	m.s.want(now, "a", w)
	md := m.s.models["a"]
	m.s.started(md, md.loading, &runtime.Instance{ID: "a-1", Model: "a", Addr: "10.0.0.1:8000", GPUs: []int{0}, Launch: md.launch})
	m.s.loaded(now, md, md.loading, time.Second, nil)
	for _, a := range m.s.take() {
		if ans, ok := a.(answer); ok {
			ans.send(m.board)
		}
	}
	(<-w.reply).m.use.release("a")
	return m
}

// TestTryLeaseAllocs: leasing a ready model and giving the lease back
// allocates nothing.
func TestTryLeaseAllocs(t *testing.T) {
	m := readyManager(t)
	if n := testing.AllocsPerRun(1000, func() {
		l, ok := m.TryLease("a")
		if !ok {
			t.Fatal("a is not ready")
		}
		l.Release()
	}); n != 0 {
		t.Fatalf("%v allocs per lease, want 0", n)
	}
}

// BenchmarkTryLease times the request path's whole cost in the manager:
// a lease on a ready model, given back.
func BenchmarkTryLease(b *testing.B) {
	m := readyManager(b)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			l, _ := m.TryLease("a")
			l.Release()
		}
	})
}

// TestLeaseEndsWithTheManager: a request waiting for a load is answered
// ErrClosed when the manager stops, not left to its own deadline.
func TestLeaseEndsWithTheManager(t *testing.T) {
	rt := newFakeRuntime(t)
	rt.health.Store(http.StatusServiceUnavailable) // the load goes on
	m, stop := runManagerStop(t, strings.Replace(schedConfig, "load_timeout: 1m", "load_timeout: 1h", 1)+"models:\n  a: {vram: 20GiB}\n", rt)
	errc := make(chan error, 1)
	go func() {
		lctx, lcancel := context.WithTimeout(context.Background(), time.Minute)
		defer lcancel()
		_, err := m.Lease(lctx, "a")
		errc <- err
	}()
	// Wait until the request is waiting for the load.
	for v := m.View(); v.Model("a").Waiting == 0; v = m.View() {
		<-v.Changed()
	}
	stop()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("%v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Lease still waiting 5s after the manager stopped")
	}
}
