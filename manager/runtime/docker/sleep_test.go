package docker

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/moby/moby/api/types/container"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager/managertest"
	"github.com/vgw-project/vgw/manager/runtime"
	"github.com/vgw-project/vgw/manager/runtime/docker/dockertest"
	"github.com/vgw-project/vgw/manager/runtime/vllm"
)

// The Docker runtime's sleep support (sleep.go), on the real engine: the
// fake vLLM in its container serves vLLM's sleep endpoints when started
// with --enable-sleep-mode (vllm.Args, from Spec.Sleep) and
// VLLM_SERVER_DEV_MODE=1 (vllm.Env, which the manager puts in Spec.Env).

// startServing starts spec's container on a runtime of its own and waits
// until its server answers a chat: Start returns once the container runs,
// not once vLLM in it is ready.
func startServing(t *testing.T, spec runtime.Spec) (*Runtime, *runtime.Instance) {
	t.Helper()
	e := dockertest.Need(t)
	rt, err := New(Options{Instance: e.Instance(t), Image: e.Image, Network: e.Network})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	inst, err := rt.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, spec.Model+"'s server serves", func() bool { return managertest.Chat(inst.Addr, spec.Model) == http.StatusOK })
	return rt, inst
}

// sleepSpec is model a's spec with sleep setting s, and the environment
// the manager would give it (vllm.Env).
func sleepSpec(s config.Sleep) runtime.Spec {
	return runtime.Spec{Model: "a", Config: &config.Model{Repo: "org/a"}, Utilization: 0.5, Sleep: s, Env: vllm.Env(s)}
}

// completion asks the server at addr for a completion: its status and body.
// The fake answers nonsense ("#####") from weights woken empty after a
// level 2 sleep and never reloaded, which a chat's status cannot show.
func completion(t *testing.T, addr, model string) (int, string) {
	t.Helper()
	resp, err := http.Post("http://"+addr+"/v1/completions", "application/json",
		strings.NewReader(`{"model":"`+model+`","prompt":"Hello","max_tokens":4}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// TestDockerSleep: a container started with a sleep level falls asleep at
// that level, refuses inference while asleep, holds host memory, and
// wakes to serve sense again, whether the level it sleeps at is known or
// not (Wake's level 0, woken as level 2 is, the sequence that wakes
// either level). WarmUp fails while it sleeps and works once it is awake.
func TestDockerSleep(t *testing.T) {
	tests := []struct {
		name  string
		sleep config.Sleep
		level int // Sleep's
		wake  int // Wake's
	}{
		{"level 1", config.SleepLevel1, 1, 1},
		{"level 2", config.SleepLevel2, 2, 2},
		{"level 2, woken at an unknown level", config.SleepLevel2, 2, 0},
		{"level 1, woken at an unknown level", config.SleepLevel1, 1, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec := sleepSpec(tt.sleep)
			rt, inst := startServing(t, spec)
			ctx, cancel := context.WithTimeout(context.Background(), poll.Long)
			defer cancel()

			if asleep, err := rt.IsSleeping(ctx, inst); err != nil || asleep {
				t.Fatalf("IsSleeping once started = %v, %v; want false", asleep, err)
			}
			if err := rt.Sleep(ctx, inst, tt.level); err != nil {
				t.Fatalf("Sleep(%d): %v", tt.level, err)
			}
			if asleep, err := rt.IsSleeping(ctx, inst); err != nil || !asleep {
				t.Fatalf("IsSleeping after Sleep(%d) = %v, %v; want true", tt.level, asleep, err)
			}
			if code := managertest.Chat(inst.Addr, spec.Model); code != http.StatusServiceUnavailable {
				t.Errorf("a chat while asleep answered %d, want %d", code, http.StatusServiceUnavailable)
			}
			if err := rt.WarmUp(ctx, inst, spec); err == nil || !strings.Contains(err.Error(), "503") {
				t.Errorf("WarmUp while asleep: %v, want the server's 503", err)
			}
			// The fake's process holds a few MiB; 1 GiB would be the
			// cgroup's limit or the page cache, not what it holds.
			if mem, err := rt.HostMemory(ctx, inst); err != nil || mem == 0 || mem >= 1<<30 {
				t.Errorf("HostMemory while asleep = %d, %v; want a few MiB", mem, err)
			}

			if err := rt.Wake(ctx, inst, tt.wake); err != nil {
				t.Fatalf("Wake(%d): %v", tt.wake, err)
			}
			if asleep, err := rt.IsSleeping(ctx, inst); err != nil || asleep {
				t.Fatalf("IsSleeping after Wake(%d) = %v, %v; want false", tt.wake, asleep, err)
			}
			if code := managertest.Chat(inst.Addr, spec.Model); code != http.StatusOK {
				t.Errorf("a chat once awake answered %d, want %d", code, http.StatusOK)
			}
			if code, body := completion(t, inst.Addr, spec.Model); code != http.StatusOK || strings.Contains(body, "#####") {
				t.Errorf("a completion once awake answered %d %s; want 200 from reloaded weights", code, body)
			}
			if err := rt.WarmUp(ctx, inst, spec); err != nil {
				t.Errorf("WarmUp once awake: %v", err)
			}
		})
	}
}

// TestDockerSleepRefused: a server that cannot sleep says why, and
// serves on: one started without sleep mode refuses (vLLM's 500), and
// one without VLLM_SERVER_DEV_MODE=1 has no sleep endpoints at all.
func TestDockerSleepRefused(t *testing.T) {
	tests := []struct {
		name string
		spec runtime.Spec
		say  string
	}{
		{"no sleep mode", runtime.Spec{Model: "a", Config: &config.Model{Repo: "org/a"}, Utilization: 0.5, Env: vllm.Env(config.SleepLevel1)},
			"Sleep mode is not enabled"},
		{"no development mode", runtime.Spec{Model: "a", Config: &config.Model{Repo: "org/a"}, Utilization: 0.5, Sleep: config.SleepLevel1},
			"404"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rt, inst := startServing(t, tt.spec)
			ctx, cancel := context.WithTimeout(context.Background(), poll.Long)
			defer cancel()
			if err := rt.Sleep(ctx, inst, 1); err == nil || !strings.Contains(err.Error(), tt.say) {
				t.Fatalf("Sleep: %v; want an error saying %q", err, tt.say)
			}
			if code := managertest.Chat(inst.Addr, tt.spec.Model); code != http.StatusOK {
				t.Errorf("a chat after the refused sleep answered %d, want %d", code, http.StatusOK)
			}
		})
	}
}

// TestDockerSleepHostMemoryGone: the host memory of a container that is
// gone is an error, not 0, which would read as a sleeper that holds
// nothing.
func TestDockerSleepHostMemoryGone(t *testing.T) {
	rt, inst := startServing(t, sleepSpec(config.SleepLevel1))
	ctx, cancel := context.WithTimeout(context.Background(), poll.Long)
	defer cancel()
	if err := rt.Stop(ctx, inst, 0); err != nil {
		t.Fatal(err)
	}
	if mem, err := rt.HostMemory(ctx, inst); err == nil {
		t.Errorf("HostMemory of a removed container = %d, no error", mem)
	}
}

// TestSleepMemoryInUse: a container's memory is its usage less the
// inactive page cache, under either cgroup version.
func TestSleepMemoryInUse(t *testing.T) {
	tests := []struct {
		name string
		in   container.MemoryStats
		want uint64
	}{
		{"cgroup v2", container.MemoryStats{Usage: 1000, Stats: map[string]uint64{"inactive_file": 300, "active_file": 100}}, 700},
		{"cgroup v1", container.MemoryStats{Usage: 1000, Stats: map[string]uint64{"total_inactive_file": 400, "cache": 600}}, 600},
		{"cgroup v1 with its own cgroup's figure too", container.MemoryStats{Usage: 1000, Stats: map[string]uint64{"total_inactive_file": 400, "inactive_file": 100}}, 600},
		{"cache not below usage: the whole usage", container.MemoryStats{Usage: 100, Stats: map[string]uint64{"inactive_file": 200}}, 100},
		{"no stats", container.MemoryStats{Usage: 1000}, 1000},
		{"nothing", container.MemoryStats{}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := memoryInUse(tt.in); got != tt.want {
				t.Errorf("memoryInUse(%+v) = %d, want %d", tt.in, got, tt.want)
			}
		})
	}
}
