package manager

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/manager/dockertest"
	"github.com/vgw-project/vgw/manager/gpu"
	"github.com/vgw-project/vgw/manager/runtime"
)

// The Docker runtime's tests run on the real engine, with the fake vLLM
// built into an image that takes vLLM's command line; GPUs are declared,
// so no GPU device is requested.

// dockerManager is a manager on the Docker runtime.
type dockerManager struct {
	*Manager
	rt       *DockerRuntime
	engine   *dockertest.Engine
	instance string
	events   *eventLog
	stop     func() // ends the manager's loop and closes the runtime, leaving containers running
}

// eventLog records a manager's events.
type eventLog struct {
	mu     sync.Mutex
	events []Event
}

func (l *eventLog) add(e Event) { l.mu.Lock(); l.events = append(l.events, e); l.mu.Unlock() }

// find returns the first event of kind for model.
func (l *eventLog) find(model, kind string) (Event, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, e := range l.events {
		if e.Model == model && e.Kind == kind {
			return e, true
		}
	}
	return Event{}, false
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
	return startDockerManagerAt(t, yaml, DockerOptions{Instance: instance, Env: map[string]string{"HF_TOKEN": "hf_from_vgw_env"}})
}

// container inspects the model's container by name.
func (dm *dockerManager) container(t *testing.T, model string) (container.InspectResponse, bool) {
	t.Helper()
	res, err := dm.engine.Client.ContainerInspect(context.Background(), ContainerName(dm.instance, model), client.ContainerInspectOptions{})
	if cerrdefs.IsNotFound(err) {
		return container.InspectResponse{}, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return res.Container, true
}

func (dm *dockerManager) ensure(t *testing.T, model string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), long)
	defer cancel()
	err := dm.Ensure(ctx, model)
	if err == nil {
		dm.Release(model)
	}
	return err
}

func (dm *dockerManager) status(model string) ModelStatus { return statusOf(dm.Manager, model) }

// TestDockerColdStart: a request for a model starts its container, which
// is labelled, configured as vLLM's would be, and answers at the endpoint
// the manager routes to.
func TestDockerColdStart(t *testing.T) {
	dm := startDockerManager(t, "", nil)
	if err := dm.ensure(t, "a"); err != nil {
		t.Fatal(err)
	}
	addr, ok := dm.Endpoint("a")
	if !ok {
		t.Fatal("a has no endpoint once ready")
	}
	if code := get(t, addr, "a"); code != http.StatusOK {
		t.Fatalf("a's server at %s answered %d", addr, code)
	}
	c, ok := dm.container(t, "a")
	if !ok {
		t.Fatal("no container named", ContainerName(dm.instance, "a"))
	}
	labels := c.Config.Labels
	if labels[LabelManaged] != "true" || labels[LabelInstance] != dm.instance || labels[LabelModel] != "a" || labels[LabelSignature] == "" || labels[LabelGPUs] != "0" {
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
	if _, ok := dm.events.find("a", EventEvicted); !ok {
		t.Error("a was not evicted for b")
	}
	eventually(t, "a's container is removed", func() bool { _, ok := dm.container(t, "a"); return !ok })
	if c, ok := dm.container(t, "b"); !ok || !c.State.Running {
		t.Error("b's container is not running")
	}
	addr, _ := dm.Endpoint("b")
	if code := get(t, addr, "b"); code != http.StatusOK {
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
	eventually(t, "the crash is noticed", func() bool { _, ok := dm.events.find("a", EventCrashed); return ok })
	e, _ := dm.events.find("a", EventCrashed)
	if !strings.Contains(e.Detail, "SIGKILL") {
		t.Errorf("crash detail %q", e.Detail)
	}
	if st := dm.status("a"); st.State != Stopped {
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
	addr, _ := dm.Endpoint("crashy")
	get(t, addr, "crashy") // its first request kills it
	eventually(t, "the crash is noticed", func() bool { _, ok := dm.events.find("crashy", EventCrashed); return ok })
	e, _ := dm.events.find("crashy", EventCrashed)
	if !strings.Contains(e.Detail, "exited, code 1") || !strings.Contains(e.Detail, "engine core died unexpectedly") {
		t.Errorf("crash detail %q, want the exit and the server's last words", e.Detail)
	}
}

// TestDockerNeverHealthy: a load that never becomes healthy times out, and
// its container is removed. The container's start is not cut short by
// the load_timeout, so that the timeout is always the health's, however
// long Docker takes to start it.
func TestDockerNeverHealthy(t *testing.T) {
	e := dockertest.Need(t)
	instance := e.Instance(t)
	yaml := strings.Replace(fmt.Sprintf(dockerConfig, e.Image, e.Network, instance), "load_timeout: 1m", "load_timeout: 3s", 1)
	dm := startDockerManagerWrapped(t, yaml, DockerOptions{Instance: instance}, func(rt Runtime) Runtime { return startUncut{rt} })
	err := dm.ensure(t, "slow")
	var le *LoadError
	if !errors.As(err, &le) || !strings.Contains(err.Error(), "not healthy within load_timeout") {
		t.Fatalf("slow: %v", err)
	}
	eventually(t, "slow's container is removed", func() bool { _, ok := dm.container(t, "slow"); return !ok })
}

// startUncut is a runtime whose starts finish whatever becomes of the
// load's context.
type startUncut struct{ Runtime }

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
	addr, _ := first.Endpoint("a")
	a, _ := first.container(t, "a")
	first.stop() // vgw exits; its containers run on
	// A stopped container of this vgw's, left behind.
	stale, err := e.Client.ContainerCreate(context.Background(), client.ContainerCreateOptions{Name: ContainerName(instance, "b"),
		Config: &container.Config{Image: e.Image, Labels: map[string]string{LabelManaged: "true", LabelInstance: instance, LabelModel: "b"}}})
	if err != nil {
		t.Fatal(err)
	}

	// Another vgw's container, and one with no labels: not this vgw's.
	for _, labels := range []map[string]string{{LabelManaged: "true", LabelInstance: instance + "-other", LabelModel: "a"}, nil} {
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
	eventually(t, "a is adopted", func() bool { return second.status("a").State == Ready })
	if got, _ := second.Endpoint("a"); got != addr {
		t.Errorf("a's endpoint %s after the restart, was %s", got, addr)
	}
	if again, _ := second.container(t, "a"); again.ID != a.ID {
		t.Errorf("a runs in a new container %s, was %s", again.ID, a.ID)
	}
	if ev, ok := second.events.find("a", EventReady); !ok || !strings.Contains(ev.Detail, "adopted") {
		t.Errorf("a's ready event %+v", ev)
	}
	if err := second.ensure(t, "a"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the stale and the mismatched containers are removed", func() bool {
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
	other, err := cli.ContainerCreate(context.Background(), client.ContainerCreateOptions{Name: ContainerName(dm.instance, "a"),
		Config: &container.Config{Image: dm.engine.Image, Cmd: []string{"--model", "theirs"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cli.ContainerRemove(context.Background(), other.ID, client.ContainerRemoveOptions{Force: true})
	})
	err = dm.ensure(t, "a")
	if !errors.Is(err, ErrNameTaken) || !strings.Contains(err.Error(), "leaves it alone") {
		t.Fatalf("a: %v", err)
	}
	if c, ok := dm.container(t, "a"); !ok || c.ID != other.ID {
		t.Fatal("the other container was touched")
	}
	if _, ok := dm.events.find("a", EventLoadFailed); !ok {
		t.Error("no load_failed event")
	}
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
	if !errors.Is(err, ErrImageMissing) || !strings.Contains(err.Error(), "docker pull "+missing) {
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

// TestDockerErrors: what a user can act on is said so, for each cause.
func TestDockerErrors(t *testing.T) {
	e := dockertest.Need(t)
	spec := runtime.Spec{Model: "a", Config: &config.Model{Repo: "org/a"}, GPUs: []gpu.GPU{{Index: 0, UUID: "GPU-00000000-0000-0000-0000-000000000000"}}}
	tests := []struct {
		name string
		opt  DockerOptions
		want error
		say  string
	}{
		{"no NVIDIA runtime", DockerOptions{Image: e.Image, Network: e.Network, GPUDevices: true}, ErrNoGPURuntime, "NVIDIA Container Toolkit"},
		{"no network", DockerOptions{Image: e.Image, Network: "vgw-test-no-such-network"}, ErrNetworkMissing, "docker network create"},
		{"daemon unreachable", DockerOptions{Host: "unix:///nonexistent/docker.sock", Image: e.Image, Network: e.Network}, ErrDockerUnreachable, "is dockerd running"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.opt.Instance = e.Instance(t)
			rt, err := NewDockerRuntime(tt.opt)
			if err != nil {
				t.Fatal(err)
			}
			defer rt.Close()
			inst, err := rt.Start(context.Background(), spec)
			if tt.want == ErrNoGPURuntime && err == nil {
				rt.Stop(context.Background(), inst, 0)
				t.Skip("this Docker engine can give containers GPUs")
			}
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.say) {
				t.Fatalf("Start: %v; want %v, saying %q", err, tt.want, tt.say)
			}
			// Nothing is left behind.
			if _, err := e.Client.ContainerInspect(context.Background(), ContainerName(tt.opt.Instance, "a"), client.ContainerInspectOptions{}); !cerrdefs.IsNotFound(err) && tt.want != ErrDockerUnreachable {
				t.Errorf("a container was left behind: %v", err)
			}
		})
	}
}

// TestDockerExitLog: a server that fails as it starts is reported with the
// end of its log, and not as an exit vgw asked for.
func TestDockerExitLog(t *testing.T) {
	e := dockertest.Need(t)
	rt, err := NewDockerRuntime(DockerOptions{Instance: e.Instance(t), Image: e.Image, Network: e.Network})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	inst, err := rt.Start(context.Background(), runtime.Spec{Model: "broken", Config: &config.Model{Repo: "org/broken"}, Env: map[string]string{"FAKEVLLM_FAIL_START": "true"}})
	if err != nil {
		// It died before Start could see it run: the error says why.
		if !strings.Contains(err.Error(), "exited as it started") || !strings.Contains(err.Error(), "memory profiling") {
			t.Fatalf("Start: %v", err)
		}
		return
	}
	select {
	case x := <-rt.Exits():
		if x.ID != inst.ID || x.Requested || x.Code != 1 || !strings.Contains(x.LogTail, "memory profiling") {
			t.Errorf("exit %+v", x)
		}
	case <-time.After(long):
		t.Fatal("no exit reported")
	}
}

func TestContainerName(t *testing.T) {
	tests := []struct{ model, want string }{
		{"llama-3.1-8b", "vgw-llama-3.1-8b"},
		{"meta-llama/Llama-3.1-8B", "vgw-meta-llama-Llama-3.1-8B-"},
		{"qwen:7b", "vgw-qwen-7b-"},
	}
	for _, tt := range tests {
		got := ContainerName("vgw", tt.model)
		if tt.want[len(tt.want)-1] == '-' {
			if !strings.HasPrefix(got, tt.want) || len(got) != len(tt.want)+8 {
				t.Errorf("ContainerName(%q) = %q, want %s and a hash", tt.model, got, tt.want)
			}
		} else if got != tt.want {
			t.Errorf("ContainerName(%q) = %q, want %q", tt.model, got, tt.want)
		}
	}
	if ContainerName("vgw", "a/b") == ContainerName("vgw", "a-b") || ContainerName("vgw", "a/b") == ContainerName("vgw", "a:b") {
		t.Error("two models share a container name")
	}
}

// BenchmarkDockerCrashNoticed times a container killed behind vgw's back
// until the runtime reports its exit (with its log tail) from Docker's
// event stream. Baseline in the same run: the kill call itself returning.
func BenchmarkDockerCrashNoticed(b *testing.B) {
	e := dockertest.Need(b)
	instance := e.Instance(b)
	cfg := parseConfig(b, fmt.Sprintf(dockerConfig, e.Image, e.Network, instance))
	rt, err := NewDockerRuntime(DockerOptions{Instance: instance, Image: e.Image, Network: e.Network})
	if err != nil {
		b.Fatal(err)
	}
	defer rt.Close()
	var noticed, killCall []float64
	for b.Loop() {
		b.StopTimer()
		inst, err := rt.Start(context.Background(), runtime.Spec{Model: "a", Config: cfg.Models["a"], Utilization: 0.5})
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		start := time.Now()
		if _, err := e.Client.ContainerKill(context.Background(), inst.ID, client.ContainerKillOptions{Signal: "SIGKILL"}); err != nil {
			b.Fatal(err)
		}
		killCall = append(killCall, float64(time.Since(start))/float64(time.Millisecond))
		x := <-rt.Exits()
		noticed = append(noticed, float64(time.Since(start))/float64(time.Millisecond))
		if x.ID != inst.ID || x.Requested {
			b.Fatalf("exit %+v", x)
		}
	}
	slices.Sort(noticed)
	slices.Sort(killCall)
	b.ReportMetric(noticed[len(noticed)/2], "noticed-p50-ms")
	b.ReportMetric(noticed[len(noticed)*99/100], "noticed-p99-ms")
	b.ReportMetric(killCall[len(killCall)/2], "kill-call-p50-ms")
}

// TestDockerReconcile: a death the event stream missed (the daemon
// restarted, or the gap outlived its memory) is found by the look the
// runtime takes after reconnecting.
func TestDockerReconcile(t *testing.T) {
	e := dockertest.Need(t)
	rt, err := NewDockerRuntime(DockerOptions{Instance: e.Instance(t), Image: e.Image, Network: e.Network})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	inst, err := rt.Start(context.Background(), runtime.Spec{Model: "a", Config: &config.Model{Repo: "org/a"}})
	if err != nil {
		t.Fatal(err)
	}
	// Remove it behind the runtime's back, and forget its tracking as an
	// event would have: then restore the tracking, as if the event had
	// been missed.
	rt.mu.Lock()
	c := rt.live[inst.ID]
	rt.mu.Unlock()
	if _, err := e.Client.ContainerRemove(context.Background(), inst.ID, client.ContainerRemoveOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	x := <-rt.Exits() // the die event
	rt.mu.Lock()
	rt.live[inst.ID] = c
	rt.mu.Unlock()
	rt.reconcile(context.Background())
	select {
	case y := <-rt.Exits():
		if y.ID != inst.ID || !strings.HasPrefix(y.Reason, "removed") || !y.Removed || y.Requested {
			t.Errorf("exit from the look: %+v (the event's: %+v)", y, x)
		}
	case <-time.After(long):
		t.Fatal("the look after reconnecting found nothing")
	}
}

// TestCreateOptions: the container's command, env, mounts, devices and
// labels, for each setting.
func TestCreateOptions(t *testing.T) {
	spec := runtime.Spec{Model: "m", Config: &config.Model{Repo: "org/m", ExtraArgs: []string{"--api-key", "sk-x", "--enforce-eager"}}, Utilization: 0.9,
		Env: map[string]string{"HF_TOKEN": "hf_model", "A": "1"}, GPUs: []gpu.GPU{{Index: 1, UUID: "GPU-b"}, {Index: 3, UUID: "GPU-d"}},
		Signature: "sig", Launch: "launch"}
	tests := []struct {
		name  string
		opt   DockerOptions
		check func(t *testing.T, o client.ContainerCreateOptions)
	}{
		{"defaults", DockerOptions{Instance: "vgw", Image: "vllm", Network: "net", Env: map[string]string{"HF_TOKEN": "hf_vgw", "B": "2"}},
			func(t *testing.T, o client.ContainerCreateOptions) {
				if o.Name != "vgw-m" || o.Config.Image != "vllm" {
					t.Errorf("name %q image %q", o.Name, o.Config.Image)
				}
				if got := strings.Join(o.Config.Cmd, " "); got != "--model org/m --served-model-name m --gpu-memory-utilization 0.9 --tensor-parallel-size 1 --enforce-eager --host 0.0.0.0 --port 8000" {
					t.Errorf("command %q", got)
				}
				env := slices.Sorted(slices.Values(o.Config.Env))
				if want := []string{"A=1", "B=2", "HF_TOKEN=hf_model", "VLLM_API_KEY=sk-x"}; !slices.Equal(env, want) {
					t.Errorf("env %q, want %q", env, want)
				}
				h := o.HostConfig
				if h.IpcMode != container.IPCModeHost || h.ShmSize != 0 || len(h.DeviceRequests) != 0 {
					t.Errorf("ipc %q shm %d devices %v", h.IpcMode, h.ShmSize, h.DeviceRequests)
				}
				if len(h.Mounts) != 1 || h.Mounts[0].Type != "volume" || h.Mounts[0].Source != "vgw-hf-cache" || h.Mounts[0].Target != "/root/.cache/huggingface" {
					t.Errorf("mounts %+v", h.Mounts)
				}
				l := o.Config.Labels
				if l[LabelManaged] != "true" || l[LabelInstance] != "vgw" || l[LabelModel] != "m" || l[LabelSignature] != "sig" || l[LabelLaunch] != "launch" || l[LabelGPUs] != "1,3" {
					t.Errorf("labels %v", l)
				}
				if _, ok := o.NetworkingConfig.EndpointsConfig["net"]; !ok {
					t.Errorf("networks %v", o.NetworkingConfig.EndpointsConfig)
				}
			}},
		{"GPUs, shm, cache dir", DockerOptions{Instance: "vgw", Image: "vllm", Network: "net", GPUDevices: true, ShmSize: 8 << 30, CacheDir: "/srv/hf"},
			func(t *testing.T, o client.ContainerCreateOptions) {
				h := o.HostConfig
				if h.IpcMode != container.IPCModePrivate || h.ShmSize != 8<<30 {
					t.Errorf("ipc %q shm %d", h.IpcMode, h.ShmSize)
				}
				if len(h.DeviceRequests) != 1 || h.DeviceRequests[0].Driver != "nvidia" || !slices.Equal(h.DeviceRequests[0].DeviceIDs, []string{"GPU-b", "GPU-d"}) {
					t.Errorf("devices %+v", h.DeviceRequests)
				}
				if len(h.Mounts) != 1 || h.Mounts[0].Type != "bind" || h.Mounts[0].Source != "/srv/hf" {
					t.Errorf("mounts %+v", h.Mounts)
				}
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &DockerRuntime{opt: tt.opt}
			o := r.createOptions(ContainerName(tt.opt.Instance, spec.Model), spec)
			if !slices.Equal(o.HostConfig.CapDrop, []string{"NET_RAW"}) {
				t.Errorf("capabilities dropped %v, want NET_RAW", o.HostConfig.CapDrop)
			}
			tt.check(t, o)
		})
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
	eventually(t, "a's container runs, still loading", func() bool {
		c, ok := first.container(t, "a")
		st := first.status("a")
		return ok && c.State.Running && st.State == Loading && st.Instance == c.ID
	})
	first.stop()

	second := startDockerManager(t, instance, edit)
	if st := second.status("a"); st.State != Loading {
		t.Fatalf("a is %v right after the restart, want loading until its /health answers", st.State)
	}
	if _, ok := second.Endpoint("a"); ok {
		t.Error("a is routed before its /health answers")
	}
	second.readyNow(t, "a")
	eventually(t, "a is ready", func() bool { return second.status("a").State == Ready })
	if ev, ok := second.events.find("a", EventReady); !ok || !strings.Contains(ev.Detail, "adopted") {
		t.Errorf("a's ready event %+v", ev)
	}
}

// readyNow ends the load of a model whose fake waits for SIGUSR1
// (FAKEVLLM_READY_ON_SIGNAL), once its /health answers: the fake catches
// the signal before it listens, so the signal cannot come too early.
func (dm *dockerManager) readyNow(t *testing.T, model string) {
	t.Helper()
	st := dm.status(model)
	eventually(t, model+"'s server answers", func() bool { return answers(st.Addr) })
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
	eventually(t, "a is ready", func() bool { return dm.status("a").State == Ready })
	for i := range 5 {
		before, ok := dm.container(t, "a")
		if !ok {
			t.Fatalf("round %d: no container for a", i)
		}
		if _, err := dm.engine.Client.ContainerRemove(context.Background(), before.ID, client.ContainerRemoveOptions{Force: true}); err != nil {
			t.Fatal(err)
		}
		eventually(t, "a is back in a new container", func() bool {
			after, ok := dm.container(t, "a")
			return ok && after.ID != before.ID && dm.status("a").State == Ready
		})
	}
	if e, failed := dm.events.find("a", EventLoadFailed); failed {
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
		eventually(t, "a loads in a new container", func() bool {
			var ok bool
			c, ok = dm.container(t, "a")
			return ok && c.ID != last && c.State.Running && dm.status("a").State == Loading
		})
		last = c.ID
		if _, err := dm.engine.Client.ContainerRemove(context.Background(), c.ID, client.ContainerRemoveOptions{Force: true}); err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
	}
	eventually(t, "a loads in a fourth container", func() bool {
		c, ok := dm.container(t, "a")
		return ok && c.ID != last && c.State.Running
	})
	c, _ := dm.container(t, "a")
	if _, err := dm.engine.Client.ContainerKill(context.Background(), c.ID, client.ContainerKillOptions{Signal: "SIGUSR1"}); err != nil {
		t.Fatal(err)
	}
	if err := <-waited; err != nil {
		t.Fatalf("the request waiting for a: %v", err)
	}
	if e, failed := dm.events.find("a", EventLoadFailed); failed {
		t.Errorf("a load failed as its container was removed by hand: %s", e.Detail)
	}
	if st := dm.status("a"); !st.RetryAt.IsZero() {
		t.Errorf("a backs off until %v", st.RetryAt)
	}
}
