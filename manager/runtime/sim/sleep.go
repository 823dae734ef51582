package sim

import (
	"context"
	"fmt"
	"net/http"

	"github.com/vgw-project/vgw/manager/runtime"
	"github.com/vgw-project/vgw/manager/runtime/vllm"
)

// The Runtime is a manager.Sleeper: its fakes serve vLLM's sleep
// endpoints (internal/fakevllm), taking the model's sim sleep_delay and
// wake_delay, and it charges a sleeping fake what vLLM would keep: the
// model's sim residual_vram of each GPU and, at level 1, the rest of its
// GPU memory as host memory (the weights moved there, taken at their
// most); at level 2 no host memory.

var sleepClient = &http.Client{}

// Sleep puts the fake to sleep, then charges it asleep.
func (r *Runtime) Sleep(ctx context.Context, inst *runtime.Instance, level int) error {
	if err := vllm.Sleep(ctx, sleepClient, inst.Addr, level); err != nil {
		return err
	}
	return r.recharge(inst, func(p *proc) (uint64, uint64) {
		host := uint64(0)
		if level == 1 {
			host = (p.perGPU - p.residual) * uint64(len(p.gpus))
		}
		return p.residual, host
	})
}

// Wake wakes the fake (level 0, not known, as level 2), then charges it
// awake.
func (r *Runtime) Wake(ctx context.Context, inst *runtime.Instance, level int) error {
	if level == 0 {
		level = 2
	}
	// Its memory comes back before its weights do, as vLLM's does.
	if err := r.recharge(inst, func(p *proc) (uint64, uint64) { return p.perGPU, p.host }); err != nil {
		return err
	}
	if err := vllm.Wake(ctx, sleepClient, inst.Addr, level); err != nil {
		return err
	}
	return r.recharge(inst, func(p *proc) (uint64, uint64) { return p.perGPU, 0 })
}

// IsSleeping asks the fake.
func (r *Runtime) IsSleeping(ctx context.Context, inst *runtime.Instance) (bool, error) {
	return vllm.IsSleeping(ctx, sleepClient, inst.Addr)
}

// WarmUp sends the fake its first request.
func (r *Runtime) WarmUp(ctx context.Context, inst *runtime.Instance, spec runtime.Spec) error {
	return vllm.WarmUp(ctx, sleepClient, inst.Addr, spec.Model, "")
}

// HostMemory is the host memory the fake is charged.
func (r *Runtime) HostMemory(_ context.Context, inst *runtime.Instance) (uint64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	p, ok := r.procs[inst.ID]
	if !ok {
		return 0, fmt.Errorf("sim: no fake %s", inst.ID)
	}
	return p.host, nil
}

// Host is the host memory all fakes are charged: what the machine's
// memory would hold for sleeping models.
func (r *Runtime) Host() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	var n uint64
	for _, p := range r.procs {
		n += p.host
	}
	return n
}

// recharge charges inst's fake what f says of each GPU and of host memory.
func (r *Runtime) recharge(inst *runtime.Instance, f func(*proc) (perGPU, host uint64)) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	p, ok := r.procs[inst.ID]
	if !ok {
		return fmt.Errorf("sim: no fake %s", inst.ID)
	}
	gpu, host := f(p)
	p.host = host
	r.gpus.Uncharge(inst.PIDs[0])
	r.gpus.Charge(inst.PIDs[0], p.gpus, gpu)
	return nil
}

// Live counts the fakes running.
func (r *Runtime) Live() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.procs)
}
