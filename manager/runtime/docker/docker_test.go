package docker_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"

	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/manager/managertest"
	"github.com/vgw-project/vgw/manager/runtime"
	"github.com/vgw-project/vgw/manager/runtime/docker"
	"github.com/vgw-project/vgw/manager/runtime/docker/dockertest"
)

// These tests run a whole manager on the Docker runtime, on the real
// engine, with the fake vLLM built into an image that takes vLLM's
// command line; GPUs are declared, so no GPU device is requested. The
// runtime's own tests are in runtime_test.go.

// dockerManager is a manager on the Docker runtime.
type dockerManager struct {
	*manager.Manager
	rt       *docker.Runtime
	engine   *dockertest.Engine
	instance string
	events   *eventLog
	stop     func() // ends the manager's loop and closes the runtime, leaving containers running
}

// eventLog records a manager's events.
type eventLog struct {
	mu     sync.Mutex
	events []manager.Event
}

func (l *eventLog) add(e manager.Event) { l.mu.Lock(); l.events = append(l.events, e); l.mu.Unlock() }

// find returns the first event of kind for model.
func (l *eventLog) find(model, kind string) (manager.Event, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, e := range l.events {
		if e.Model == model && e.Kind == kind {
			return e, true
		}
	}
	return manager.Event{}, false
}

const dockerConfig = `
runtime: {kind: docker, image: %s, network: %s, instance: %s}
load_timeout: 1m
drain_timeout: 2s
min_resident: 0s
inactivity_timeout: 0s
gpus: [{name: g0, memory: 80GiB}]
models:
  a: {repo: org/a, vram: 50GiB, env: {FAKEVLLM_STARTUP_DELAY: 100ms}}
  b: {repo: org/b, vram: 50GiB}
  slow: {repo: org/slow, vram: 10GiB, env: {FAKEVLLM_STARTUP_DELAY: 1h}}
  crashy: {repo: org/crashy, vram: 10GiB, env: {FAKEVLLM_CRASH_AFTER: "1"}}
`

// startDockerManager runs a manager on the Docker runtime under instance
// (a new one when ""), with config edits applied to dockerConfig.
func startDockerManager(t *testing.T, instance string, edit func(string) string) *dockerManager {
	t.Helper()
	e := dockertest.Need(t)
	if instance == "" {
		instance = e.Instance(t)
	}
	yaml := fmt.Sprintf(dockerConfig, e.Image, e.Network, instance)
	if edit != nil {
		yaml = edit(yaml)
	}
	return startDockerManagerAt(t, yaml, docker.Options{Instance: instance, Env: map[string]string{"HF_TOKEN": "hf_from_vgw_env"}})
}

// container inspects the model's container by name.
func (dm *dockerManager) container(t *testing.T, model string) (container.InspectResponse, bool) {
	t.Helper()
	res, err := dm.engine.Client.ContainerInspect(context.Background(), docker.ContainerName(dm.instance, model), client.ContainerInspectOptions{})
	if cerrdefs.IsNotFound(err) {
		return container.InspectResponse{}, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return res.Container, true
}

// ensure leases model and gives the lease back at once: the model is
// ready, or why not.
func (dm *dockerManager) ensure(t *testing.T, model string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), poll.Long)
	defer cancel()
	l, err := dm.Lease(ctx, model)
	if err == nil {
		l.Release()
	}
	return err
}

// status is the model called name in the manager's latest View; the zero
// ModelView when there is none.
func (dm *dockerManager) status(model string) manager.ModelView {
	if mv := dm.View().Model(model); mv != nil {
		return *mv
	}
	return manager.ModelView{}
}

// TestLoadErrorPublic: what a client is told of a load the Docker runtime
// failed names the kind of failure (the error's runtime.PublicError), and
// nothing of the daemon's address or the image; the whole error keeps
// them for operators. ErrUnreachable is a runtime.ErrUnreachable, which
// the manager retries at its first backoff interval.
func TestLoadErrorPublic(t *testing.T) {
	tests := []struct {
		name   string
		err    error // as Start wraps it
		public string
	}{
		{"Docker away", fmt.Errorf("%w at tcp://10.1.2.3:2376 (is dockerd running, and may vgw use its socket?): create container vgw-a: connection refused", docker.ErrUnreachable),
			"the Docker daemon cannot be reached"},
		{"image missing", fmt.Errorf("%w: vllm/vllm-openai:v9; pull it (docker pull vllm/vllm-openai:v9) or set runtime.image; vgw does not pull images", docker.ErrImageMissing),
			"the image is not on this Docker host"},
		{"no GPU runtime", fmt.Errorf("%w: install the NVIDIA Container Toolkit and restart dockerd (Docker said: could not select device driver \"nvidia\" at tcp://10.1.2.3:2376)", docker.ErrNoGPURuntime),
			"this Docker engine cannot give containers GPUs"},
		{"network missing", fmt.Errorf("%w: vgw-10.1.2.3; create it (docker network create vgw-10.1.2.3) and attach Envoy and vgw to it, or set runtime.network", docker.ErrNetworkMissing),
			"the Docker network does not exist"},
		{"name taken", fmt.Errorf("%w vgw-a; vgw leaves it alone: remove or rename it, or give this vgw another runtime.instance (vllm/vllm-openai at 10.1.2.3)", docker.ErrNameTaken),
			"a container vgw did not create has the name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := &manager.LoadError{Model: "a", Err: tt.err}
			if got, want := e.Public(), "model a failed to load: "+tt.public; got != want {
				t.Errorf("Public() = %q, want %q", got, want)
			}
			for _, hidden := range []string{"10.1.2.3", "vllm/vllm-openai"} {
				if strings.Contains(e.Public(), hidden) {
					t.Errorf("Public() shows %q", hidden)
				}
			}
			if !strings.Contains(e.Error(), tt.err.Error()) {
				t.Error("Error() lost the detail operators need")
			}
		})
	}
	if !errors.Is(fmt.Errorf("create container: %w", docker.ErrUnreachable), runtime.ErrUnreachable) {
		t.Error("docker.ErrUnreachable is not a runtime.ErrUnreachable")
	}
}

// TestDockerColdStart: a request for a model starts its container, which
// is labelled, configured as vLLM's would be, and answers at the endpoint
// the manager routes to.
func TestDockerColdStart(t *testing.T) {
	dm := startDockerManager(t, "", nil)
	if err := dm.ensure(t, "a"); err != nil {
		t.Fatal(err)
	}
	addr := dm.status("a").Endpoint
	if addr == "" {
		t.Fatal("a has no endpoint once ready")
	}
	if code := managertest.Chat(addr, "a"); code != http.StatusOK {
		t.Fatalf("a's server at %s answered %d", addr, code)
	}
	c, ok := dm.container(t, "a")
	if !ok {
		t.Fatal("no container named", docker.ContainerName(dm.instance, "a"))
	}
	labels := c.Config.Labels
	if labels[docker.LabelManaged] != "true" || labels[docker.LabelInstance] != dm.instance || labels[docker.LabelModel] != "a" || labels[docker.LabelSignature] == "" || labels[docker.LabelGPUs] != "0" {
		t.Errorf("labels %v", labels)
	}
	cmd := strings.Join(c.Config.Cmd, " ")
	for _, want := range []string{"--model org/a", "--served-model-name a", "--gpu-memory-utilization 0.63", "--tensor-parallel-size 1", "--host 0.0.0.0 --port 8000"} {
		if !strings.Contains(cmd, want) {
			t.Errorf("command %q lacks %q", cmd, want)
		}
	}
	if !slices.Contains(c.Config.Env, "HF_TOKEN=hf_from_vgw_env") || !slices.Contains(c.Config.Env, "FAKEVLLM_STARTUP_DELAY=100ms") {
		t.Errorf("env %q", c.Config.Env)
	}
	if c.HostConfig.IpcMode != container.IPCModeHost || len(c.HostConfig.DeviceRequests) != 0 || c.HostConfig.RestartPolicy.Name != container.RestartPolicyDisabled {
		t.Errorf("host config: ipc %q, devices %v, restart %q", c.HostConfig.IpcMode, c.HostConfig.DeviceRequests, c.HostConfig.RestartPolicy.Name)
	}
	inst := &runtime.Instance{ID: c.ID, PIDs: []int{c.State.Pid}}
	if pids, err := dm.rt.PIDs(context.Background(), inst); err != nil || !slices.Contains(pids, c.State.Pid) {
		t.Errorf("PIDs %v %v, want the container's process %d", pids, err, c.State.Pid)
	}
}

// TestDockerEviction: a model that needs the GPU swaps the idle one's
// container for its own.
func TestDockerEviction(t *testing.T) {
	dm := startDockerManager(t, "", nil)
	if err := dm.ensure(t, "a"); err != nil {
		t.Fatal(err)
	}
	if err := dm.ensure(t, "b"); err != nil {
		t.Fatal(err)
	}
	if _, ok := dm.events.find("a", manager.EventEvicted); !ok {
		t.Error("a was not evicted for b")
	}
	poll.Until(t, "a's container is removed", func() bool { _, ok := dm.container(t, "a"); return !ok })
	if c, ok := dm.container(t, "b"); !ok || !c.State.Running {
		t.Error("b's container is not running")
	}
	addr := dm.status("b").Endpoint
	if code := managertest.Chat(addr, "b"); code != http.StatusOK {
		t.Errorf("b answered %d", code)
	}
}

// TestDockerCrash: a container killed behind vgw's back is noticed from
// Docker's events (how soon, BenchmarkDockerCrashNoticed measures), kept
// (for `docker logs`) until the model starts again, and the next request
// loads the model again.
func TestDockerCrash(t *testing.T) {
	dm := startDockerManager(t, "", nil)
	if err := dm.ensure(t, "a"); err != nil {
		t.Fatal(err)
	}
	before, _ := dm.container(t, "a")
	if _, err := dm.engine.Client.ContainerKill(context.Background(), before.ID, client.ContainerKillOptions{Signal: "SIGKILL"}); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "the crash is noticed", func() bool { _, ok := dm.events.find("a", manager.EventCrashed); return ok })
	e, _ := dm.events.find("a", manager.EventCrashed)
	if !strings.Contains(e.Detail, "SIGKILL") {
		t.Errorf("crash detail %q", e.Detail)
	}
	if st := dm.status("a"); st.State != manager.Stopped {
		t.Errorf("a is %v after its crash", st.State)
	}
	if c, ok := dm.container(t, "a"); !ok || c.State.Running {
		t.Error("the crashed container is gone, or running")
	}
	if err := dm.ensure(t, "a"); err != nil {
		t.Fatal(err)
	}
	if after, _ := dm.container(t, "a"); after.ID == before.ID || !after.State.Running {
		t.Errorf("a was not started again in a new container: %s, running %v", after.ID, after.State.Running)
	}
}

// TestDockerCrashLog: a server that dies on its own says why in the exit,
// with the end of its log.
func TestDockerCrashLog(t *testing.T) {
	dm := startDockerManager(t, "", nil)
	if err := dm.ensure(t, "crashy"); err != nil {
		t.Fatal(err)
	}
	addr := dm.status("crashy").Endpoint
	managertest.Chat(addr, "crashy") // its first request kills it
	poll.Until(t, "the crash is noticed", func() bool { _, ok := dm.events.find("crashy", manager.EventCrashed); return ok })
	e, _ := dm.events.find("crashy", manager.EventCrashed)
	if !strings.Contains(e.Detail, "exited, code 1") || !strings.Contains(e.Detail, "engine core died unexpectedly") {
		t.Errorf("crash detail %q, want the exit and the server's last words", e.Detail)
	}
}

// TestDockerNeverHealthy: a load that never becomes healthy times out, and
// its container is removed. The container's start is not cut short by
// the load_timeout, so that the timeout is always the health's, however
// poll.Long Docker takes to start it.
func TestDockerNeverHealthy(t *testing.T) {
	e := dockertest.Need(t)
	instance := e.Instance(t)
	yaml := strings.Replace(fmt.Sprintf(dockerConfig, e.Image, e.Network, instance), "load_timeout: 1m", "load_timeout: 3s", 1)
	dm := startDockerManagerWrapped(t, yaml, docker.Options{Instance: instance}, func(rt manager.Runtime) manager.Runtime { return startUncut{rt} })
	err := dm.ensure(t, "slow")
	var le *manager.LoadError
	if !errors.As(err, &le) || !strings.Contains(err.Error(), "not healthy within load_timeout") {
		t.Fatalf("slow: %v", err)
	}
	poll.Until(t, "slow's container is removed", func() bool { _, ok := dm.container(t, "slow"); return !ok })
}

// startUncut is a runtime whose starts finish whatever becomes of the
// load's context.
type startUncut struct{ manager.Runtime }

func (s startUncut) Start(ctx context.Context, spec runtime.Spec) (*runtime.Instance, error) {
	return s.Runtime.Start(context.WithoutCancel(ctx), spec)
}

// TestDockerAdopt: a vgw restarted while models run adopts their
// containers (no new container, same endpoint), removes its stopped ones,
// and stops the running ones whose settings no longer match.
func TestDockerAdopt(t *testing.T) {
	e := dockertest.Need(t)
	instance := e.Instance(t)
	first := startDockerManager(t, instance, nil)
	if err := first.ensure(t, "a"); err != nil {
		t.Fatal(err)
	}
	if err := first.ensure(t, "crashy"); err != nil {
		t.Fatal(err)
	}
	addr := first.status("a").Endpoint
	a, _ := first.container(t, "a")
	first.stop() // vgw exits; its containers run on
	// A stopped container of this vgw's, left behind.
	stale, err := e.Client.ContainerCreate(context.Background(), client.ContainerCreateOptions{Name: docker.ContainerName(instance, "b"),
		Config: &container.Config{Image: e.Image, Labels: map[string]string{docker.LabelManaged: "true", docker.LabelInstance: instance, docker.LabelModel: "b"}}})
	if err != nil {
		t.Fatal(err)
	}

	// Another vgw's container, and one with no labels: not this vgw's.
	for _, labels := range []map[string]string{{docker.LabelManaged: "true", docker.LabelInstance: instance + "-other", docker.LabelModel: "a"}, nil} {
		other, err := e.Client.ContainerCreate(context.Background(), client.ContainerCreateOptions{
			Config: &container.Config{Image: e.Image, Cmd: []string{"--model", "x"}, Labels: labels}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.Client.ContainerStart(context.Background(), other.ID, client.ContainerStartOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			e.Client.ContainerRemove(context.Background(), other.ID, client.ContainerRemoveOptions{Force: true})
		})
		defer func() {
			if c, err := e.Client.ContainerInspect(context.Background(), other.ID, client.ContainerInspectOptions{}); err != nil || !c.Container.State.Running {
				t.Errorf("a container not this vgw's (labels %v) was touched: %v", labels, err)
			}
		}()
	}

	// crashy's settings change: its container no longer matches.
	second := startDockerManager(t, instance, func(y string) string {
		return strings.Replace(y, `crashy: {repo: org/crashy,`, `crashy: {repo: org/crashy, max_model_len: 4096,`, 1)
	})
	poll.Until(t, "a is adopted", func() bool { return second.status("a").State == manager.Ready })
	if got := second.status("a").Endpoint; got != addr {
		t.Errorf("a's endpoint %s after the restart, was %s", got, addr)
	}
	if again, _ := second.container(t, "a"); again.ID != a.ID {
		t.Errorf("a runs in a new container %s, was %s", again.ID, a.ID)
	}
	// The View shows a ready model before its ready event is told.
	poll.Until(t, "a's ready event is told", func() bool { _, ok := second.events.find("a", manager.EventReady); return ok })
	if ev, _ := second.events.find("a", manager.EventReady); !strings.Contains(ev.Detail, "adopted") {
		t.Errorf("a's ready event %+v", ev)
	}
	if err := second.ensure(t, "a"); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "the stale and the mismatched containers are removed", func() bool {
		_, b := second.container(t, "b")
		_, c := second.container(t, "crashy")
		return !b && !c
	})
	if _, err := e.Client.ContainerInspect(context.Background(), stale.ID, client.ContainerInspectOptions{}); !cerrdefs.IsNotFound(err) {
		t.Errorf("the stale container: %v", err)
	}
}

// TestDockerNameTaken: a container vgw did not create that holds a
// model's name is left alone, and the load says why; once it is gone,
// the model loads.
func TestDockerNameTaken(t *testing.T) {
	dm := startDockerManager(t, "", nil)
	cli := dm.engine.Client
	other, err := cli.ContainerCreate(context.Background(), client.ContainerCreateOptions{Name: docker.ContainerName(dm.instance, "a"),
		Config: &container.Config{Image: dm.engine.Image, Cmd: []string{"--model", "theirs"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cli.ContainerRemove(context.Background(), other.ID, client.ContainerRemoveOptions{Force: true})
	})
	err = dm.ensure(t, "a")
	if !errors.Is(err, docker.ErrNameTaken) || !strings.Contains(err.Error(), "leaves it alone") {
		t.Fatalf("a: %v", err)
	}
	if c, ok := dm.container(t, "a"); !ok || c.ID != other.ID {
		t.Fatal("the other container was touched")
	}
	// The event is told just after the load's waiter is answered.
	poll.Until(t, "a load_failed event is told", func() bool { _, ok := dm.events.find("a", manager.EventLoadFailed); return ok })
	cli.ContainerRemove(context.Background(), other.ID, client.ContainerRemoveOptions{Force: true})
	if err := dm.Load(context.Background(), "a", true); err != nil {
		t.Fatalf("a, once the name is free: %v", err)
	}
}

// TestDockerImageMissing: a missing image fails the load with what to do,
// and the model loads once the image is there.
func TestDockerImageMissing(t *testing.T) {
	e := dockertest.Need(t)
	missing := "vgw-test-missing:" + strings.ReplaceAll(strings.ToLower(t.Name()), "/", "-")
	dm := startDockerManager(t, "", func(y string) string { return strings.Replace(y, "image: "+e.Image, "image: "+missing, 1) })
	err := dm.ensure(t, "a")
	if !errors.Is(err, docker.ErrImageMissing) || !strings.Contains(err.Error(), "docker pull "+missing) {
		t.Fatalf("a: %v", err)
	}
	if _, err := e.Client.ImageTag(context.Background(), client.ImageTagOptions{Source: e.Image, Target: missing}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Client.ImageRemove(context.Background(), missing, client.ImageRemoveOptions{}) })
	if err := dm.Load(context.Background(), "a", true); err != nil {
		t.Fatalf("a, once the image is there: %v", err)
	}
}

// TestDockerAdoptLoading: a container still loading when vgw restarts is
// adopted as loading, and routed only once its /health answers. Its fake
// stays loading until the test sends it SIGUSR1.
func TestDockerAdoptLoading(t *testing.T) {
	e := dockertest.Need(t)
	instance := e.Instance(t)
	edit := func(y string) string {
		return strings.Replace(y, "FAKEVLLM_STARTUP_DELAY: 100ms", "FAKEVLLM_READY_ON_SIGNAL: USR1", 1)
	}
	first := startDockerManager(t, instance, edit)
	if err := first.Load(context.Background(), "a", false); err != nil {
		t.Fatal(err)
	}
	// Stopped once the runtime has handed over a's container, still
	// loading: a vgw stopped in the middle of Docker's start call may
	// remove the container it was starting, which is not this test's case.
	poll.Until(t, "a's container runs, still loading", func() bool {
		c, ok := first.container(t, "a")
		st := first.status("a")
		return ok && c.State.Running && st.State == manager.Loading && st.Instance == c.ID
	})
	first.stop()

	second := startDockerManager(t, instance, edit)
	// The View shows what the new manager adopted once its loop runs.
	poll.Until(t, "a is adopted", func() bool { return second.status("a").State != manager.Stopped })
	if st := second.status("a"); st.State != manager.Loading {
		t.Fatalf("a is %v right after the restart, want loading until its /health answers", st.State)
	}
	if addr := second.status("a").Endpoint; addr != "" {
		t.Errorf("a is routed to %s before its /health answers", addr)
	}
	second.readyNow(t, "a")
	poll.Until(t, "a is ready", func() bool { return second.status("a").State == manager.Ready })
	poll.Until(t, "a's ready event is told", func() bool { _, ok := second.events.find("a", manager.EventReady); return ok })
	if ev, _ := second.events.find("a", manager.EventReady); !strings.Contains(ev.Detail, "adopted") {
		t.Errorf("a's ready event %+v", ev)
	}
}

// readyNow ends the load of a model whose fake waits for SIGUSR1
// (FAKEVLLM_READY_ON_SIGNAL), once its /health answers: the fake catches
// the signal before it listens, so the signal cannot come too early.
func (dm *dockerManager) readyNow(t *testing.T, model string) {
	t.Helper()
	st := dm.status(model)
	poll.Until(t, model+"'s server answers", func() bool { return managertest.Answers(st.Addr) })
	if _, err := dm.engine.Client.ContainerKill(context.Background(), st.Instance, client.ContainerKillOptions{Signal: "SIGUSR1"}); err != nil {
		t.Fatal(err)
	}
}

// TestDockerRemovedByHand: `docker rm -f` of a running model's container
// is a crash, not a failed load. Docker reports the death (die) while its
// own removal is still under way, so vgw's reload finds the old container
// half removed: its removal answers 409 "removal ... is already in
// progress" (daemon/delete.go), and the load must wait for Docker's
// removal to finish rather than fail.
func TestDockerRemovedByHand(t *testing.T) {
	dm := startDockerManager(t, "", func(y string) string {
		return strings.Replace(y, "a: {repo: org/a,", "a: {repo: org/a, always_on: true,", 1)
	})
	poll.Until(t, "a is ready", func() bool { return dm.status("a").State == manager.Ready })
	for i := range 5 {
		before, ok := dm.container(t, "a")
		if !ok {
			t.Fatalf("round %d: no container for a", i)
		}
		if _, err := dm.engine.Client.ContainerRemove(context.Background(), before.ID, client.ContainerRemoveOptions{Force: true}); err != nil {
			t.Fatal(err)
		}
		poll.Until(t, "a is back in a new container", func() bool {
			after, ok := dm.container(t, "a")
			return ok && after.ID != before.ID && dm.status("a").State == manager.Ready
		})
	}
	if e, failed := dm.events.find("a", manager.EventLoadFailed); failed {
		t.Errorf("a load failed after its container was removed by hand: %s", e.Detail)
	}
}

// TestDockerRemovedByHandWhileLoading: `docker rm -f` of a model's
// container while it loads is not the model's failure either: the load
// starts again at once, with no load_failed and no backoff, and the
// request waiting for it is served. Each removal failed the load, with a
// backoff doubling from 5 s, and the waiter got 503.
func TestDockerRemovedByHandWhileLoading(t *testing.T) {
	dm := startDockerManager(t, "", func(y string) string {
		return strings.Replace(y, "FAKEVLLM_STARTUP_DELAY: 100ms", "FAKEVLLM_READY_ON_SIGNAL: USR1", 1)
	})
	waited := make(chan error, 1)
	go func() { waited <- dm.ensure(t, "a") }()
	var last string
	for i := range 3 {
		var c container.InspectResponse
		poll.Until(t, "a loads in a new container", func() bool {
			var ok bool
			c, ok = dm.container(t, "a")
			return ok && c.ID != last && c.State.Running && dm.status("a").State == manager.Loading
		})
		last = c.ID
		if _, err := dm.engine.Client.ContainerRemove(context.Background(), c.ID, client.ContainerRemoveOptions{Force: true}); err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
	}
	poll.Until(t, "a loads in a fourth container", func() bool {
		c, ok := dm.container(t, "a")
		return ok && c.ID != last && c.State.Running
	})
	// The fake catches the signal only once it runs its main (as PID 1 it
	// would drop one that came sooner): wait for its /health first.
	poll.Until(t, "a's fourth server answers", func() bool {
		c, _ := dm.container(t, "a")
		st := dm.status("a")
		return st.Instance == c.ID && managertest.Answers(st.Addr)
	})
	dm.readyNow(t, "a")
	if err := <-waited; err != nil {
		t.Fatalf("the request waiting for a: %v", err)
	}
	if e, failed := dm.events.find("a", manager.EventLoadFailed); failed {
		t.Errorf("a load failed as its container was removed by hand: %s", e.Detail)
	}
	if st := dm.status("a"); !st.RetryAt.IsZero() {
		t.Errorf("a backs off until %v", st.RetryAt)
	}
}
