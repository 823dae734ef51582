package docker

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"

	"github.com/vgw-project/vgw/manager/runtime"
	"github.com/vgw-project/vgw/manager/runtime/vllm"
)

// The Runtime is a manager.Sleeper: vLLM's sleep endpoints, which a
// container started with a sleep level serves (vllm.Args, vllm.Env).

// sleepClient talks to containers' sleep endpoints; each call bounds
// itself with its context.
var sleepClient = &http.Client{}

// Sleep puts the container's vLLM to sleep at level.
func (r *Runtime) Sleep(ctx context.Context, inst *runtime.Instance, level int) error {
	return vllm.Sleep(ctx, sleepClient, inst.Addr, level)
}

// Wake wakes the container's vLLM, asleep at level (0: not known, woken
// as level 2 is).
func (r *Runtime) Wake(ctx context.Context, inst *runtime.Instance, level int) error {
	if level == 0 {
		level = 2
	}
	return vllm.Wake(ctx, sleepClient, inst.Addr, level)
}

// IsSleeping asks the container's vLLM whether it sleeps.
func (r *Runtime) IsSleeping(ctx context.Context, inst *runtime.Instance) (bool, error) {
	return vllm.IsSleeping(ctx, sleepClient, inst.Addr)
}

// WarmUp sends the container's vLLM its first request, with the API key
// it was started with, if any.
func (r *Runtime) WarmUp(ctx context.Context, inst *runtime.Instance, spec runtime.Spec) error {
	_, key := withoutAPIKey(vllm.Args(spec.Model, spec.Config, spec.Utilization, spec.Sleep))
	if key == "" {
		key = spec.Env["VLLM_API_KEY"]
	}
	return vllm.WarmUp(ctx, sleepClient, inst.Addr, spec.Model, key)
}

// HostMemory is the container's memory as `docker stats` shows it: its
// cgroup's usage less the inactive page cache, which the kernel drops
// before it runs out.
func (r *Runtime) HostMemory(ctx context.Context, inst *runtime.Instance) (uint64, error) {
	res, err := r.cli.ContainerStats(ctx, inst.ID, client.ContainerStatsOptions{})
	if err != nil {
		return 0, r.daemonError("read the memory of container "+inst.ID, err)
	}
	defer res.Body.Close()
	var st container.StatsResponse
	if err := json.NewDecoder(io.LimitReader(res.Body, 1<<20)).Decode(&st); err != nil {
		return 0, fmt.Errorf("read the memory of container %s: %w", inst.ID, err)
	}
	return memoryInUse(st.MemoryStats), nil
}

// memoryInUse is usage less the inactive page cache, as the docker CLI
// works it out (cli/command/container/stats_helpers.go,
// calculateMemUsageUnixNoCache): total_inactive_file under cgroup v1,
// whose stats carry inactive_file too but for the container's own cgroup
// alone, else inactive_file (v2); the whole usage when the cache is not
// below it.
func memoryInUse(m container.MemoryStats) uint64 {
	if v, v1 := m.Stats["total_inactive_file"]; v1 && v < m.Usage {
		return m.Usage - v
	}
	if v := m.Stats["inactive_file"]; v < m.Usage {
		return m.Usage - v
	}
	return m.Usage
}
