package docker

import (
	"context"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager/gpu"
	"github.com/vgw-project/vgw/manager/runtime"
	"github.com/vgw-project/vgw/manager/runtime/docker/dockertest"
)

// The Docker runtime's tests run on the real engine, with the fake vLLM
// built into an image that takes vLLM's command line; GPUs are declared,
// so no GPU device is requested. These test the runtime alone; those in
// docker_test.go and fault_test.go run a whole manager on it.

// TestMain removes what the tests left on the engine, for both this
// package's tests and docker_test's.
func TestMain(m *testing.M) {
	code := m.Run()
	dockertest.Cleanup()
	os.Exit(code)
}

// TestDockerErrors: what a user can act on is said so, for each cause.
func TestDockerErrors(t *testing.T) {
	e := dockertest.Need(t)
	spec := runtime.Spec{Model: "a", Config: &config.Model{Repo: "org/a"}, GPUs: []gpu.GPU{{Index: 0, UUID: "GPU-00000000-0000-0000-0000-000000000000"}}}
	tests := []struct {
		name string
		opt  Options
		want error
		say  string
	}{
		{"no NVIDIA runtime", Options{Image: e.Image, Network: e.Network, GPUDevices: true}, ErrNoGPURuntime, "NVIDIA Container Toolkit"},
		{"no network", Options{Image: e.Image, Network: "vgw-test-no-such-network"}, ErrNetworkMissing, "docker network create"},
		{"daemon unreachable", Options{Host: "unix:///nonexistent/docker.sock", Image: e.Image, Network: e.Network}, ErrUnreachable, "is dockerd running"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.opt.Instance = e.Instance(t)
			rt, err := New(tt.opt)
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
			if _, err := e.Client.ContainerInspect(context.Background(), ContainerName(tt.opt.Instance, "a"), client.ContainerInspectOptions{}); !cerrdefs.IsNotFound(err) && tt.want != ErrUnreachable {
				t.Errorf("a container was left behind: %v", err)
			}
		})
	}
}

// TestDockerExitLog: a server that fails as it starts is reported with the
// end of its log, and not as an exit vgw asked for.
func TestDockerExitLog(t *testing.T) {
	e := dockertest.Need(t)
	rt, err := New(Options{Instance: e.Instance(t), Image: e.Image, Network: e.Network})
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
	case <-time.After(poll.Long):
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
	rt, err := New(Options{Instance: instance, Image: e.Image, Network: e.Network})
	if err != nil {
		b.Fatal(err)
	}
	defer rt.Close()
	var noticed, killCall []float64
	for b.Loop() {
		b.StopTimer()
		inst, err := rt.Start(context.Background(), runtime.Spec{Model: "a", Config: &config.Model{Repo: "org/a"}, Utilization: 0.5})
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
	rt, err := New(Options{Instance: e.Instance(t), Image: e.Image, Network: e.Network})
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
	case <-time.After(poll.Long):
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
		opt   Options
		check func(t *testing.T, o client.ContainerCreateOptions)
	}{
		{"defaults", Options{Instance: "vgw", Image: "vllm", Network: "net", Env: map[string]string{"HF_TOKEN": "hf_vgw", "B": "2"}},
			func(t *testing.T, o client.ContainerCreateOptions) {
				if o.Name != "vgw-m" || o.Config.Image != "vllm" {
					t.Errorf("name %q image %q", o.Name, o.Config.Image)
				}
				if got := strings.Join(o.Config.Cmd, " "); got != "--model org/m --served-model-name m --gpu-memory-utilization 0.9 --tensor-parallel-size 1 --enforce-eager --host 0.0.0.0 --port 8000" {
					t.Errorf("command %q", got)
				}
				env := slices.Sorted(slices.Values(o.Config.Env))
				if want := []string{"A=1", "B=2", "HF_TOKEN=hf_model", "TRITON_CACHE_DIR=/root/.cache/vgw-compile/triton", "VLLM_API_KEY=sk-x", "VLLM_CACHE_ROOT=/root/.cache/vgw-compile/vllm"}; !slices.Equal(env, want) {
					t.Errorf("env %q, want %q", env, want)
				}
				h := o.HostConfig
				if h.IpcMode != container.IPCModeHost || h.ShmSize != 0 || len(h.DeviceRequests) != 0 {
					t.Errorf("ipc %q shm %d devices %v", h.IpcMode, h.ShmSize, h.DeviceRequests)
				}
				if len(h.Mounts) != 2 || h.Mounts[0].Type != "volume" || h.Mounts[0].Source != "vgw-hf-cache" || h.Mounts[0].Target != "/root/.cache/huggingface" {
					t.Errorf("mounts %+v", h.Mounts)
				}
				// The compile caches: one volume per image.
				if c := h.Mounts[1]; c.Type != "volume" || !strings.HasPrefix(c.Source, "vgw-compile-cache-") || c.Target != "/root/.cache/vgw-compile" {
					t.Errorf("compile cache mount %+v", c)
				}
				other := (&Runtime{opt: Options{Instance: "vgw", Image: "vllm:other"}}).compileCache()
				if other.Source == h.Mounts[1].Source {
					t.Errorf("two images share the compile cache %s", other.Source)
				}
				l := o.Config.Labels
				if l[LabelManaged] != "true" || l[LabelInstance] != "vgw" || l[LabelModel] != "m" || l[LabelSignature] != "sig" || l[LabelLaunch] != "launch" || l[LabelGPUs] != "1,3" {
					t.Errorf("labels %v", l)
				}
				if _, ok := o.NetworkingConfig.EndpointsConfig["net"]; !ok {
					t.Errorf("networks %v", o.NetworkingConfig.EndpointsConfig)
				}
			}},
		{"GPUs, shm, cache dir", Options{Instance: "vgw", Image: "vllm", Network: "net", GPUDevices: true, ShmSize: 8 << 30, CacheDir: "/srv/hf"},
			func(t *testing.T, o client.ContainerCreateOptions) {
				h := o.HostConfig
				if h.IpcMode != container.IPCModePrivate || h.ShmSize != 8<<30 {
					t.Errorf("ipc %q shm %d", h.IpcMode, h.ShmSize)
				}
				if len(h.DeviceRequests) != 1 || h.DeviceRequests[0].Driver != "nvidia" || !slices.Equal(h.DeviceRequests[0].DeviceIDs, []string{"GPU-b", "GPU-d"}) {
					t.Errorf("devices %+v", h.DeviceRequests)
				}
				if len(h.Mounts) != 2 || h.Mounts[0].Type != "bind" || h.Mounts[0].Source != "/srv/hf" {
					t.Errorf("mounts %+v", h.Mounts)
				}
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &Runtime{opt: tt.opt}
			o := r.createOptions(ContainerName(tt.opt.Instance, spec.Model), spec)
			if !slices.Equal(o.HostConfig.CapDrop, []string{"NET_RAW"}) {
				t.Errorf("capabilities dropped %v, want NET_RAW", o.HostConfig.CapDrop)
			}
			tt.check(t, o)
		})
	}
}

// TestCompileCacheEnv: a model's own VLLM_CACHE_ROOT or TRITON_CACHE_DIR,
// or the runtime's, wins over the shared compile cache's.
func TestCompileCacheEnv(t *testing.T) {
	spec := runtime.Spec{Model: "m", Config: &config.Model{Repo: "org/m"}, Env: map[string]string{"VLLM_CACHE_ROOT": "/mine"}}
	r := &Runtime{opt: Options{Instance: "vgw", Image: "vllm", Network: "net", Env: map[string]string{"TRITON_CACHE_DIR": "/theirs"}}}
	env := slices.Sorted(slices.Values(r.createOptions("vgw-m", spec).Config.Env))
	if want := []string{"TRITON_CACHE_DIR=/theirs", "VLLM_CACHE_ROOT=/mine"}; !slices.Equal(env, want) {
		t.Errorf("env %q, want %q", env, want)
	}
}
