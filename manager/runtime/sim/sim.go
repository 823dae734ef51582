// Package sim is the runtime for a machine with no GPU and no Docker:
// each model's server is a fake vLLM process (vgw fakevllm), its memory
// charged to declared GPUs (see Runtime).
package sim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/vgw-project/vgw/manager/gpu"
	"github.com/vgw-project/vgw/manager/runtime"
	"github.com/vgw-project/vgw/manager/runtime/vllm"
)

// Runtime runs each model as a fake vLLM process (vgw fakevllm) on a
// loopback port, and charges the model's memory to the declared GPUs while
// the process lives. Everything vgw does with a model (start, health,
// requests, crashes, stop) happens for real; only the tokens are fake.
type Runtime struct {
	// Command runs a fake vLLM: the vgw binary and "fakevllm", or the
	// fakevllm binary. The runtime adds the flags.
	command []string
	gpus    *gpu.Declared
	exits   chan runtime.Exit

	mu    sync.Mutex
	procs map[string]*proc // by instance ID
}

type proc struct {
	cmd      *exec.Cmd
	log      *runtime.LogTail
	follow   runtime.Followers // its output, line by line, for FollowLog
	done     chan struct{}     // closed once the process has been reaped
	stopping bool
	// What the fake is charged: perGPU of each of gpus awake, residual
	// asleep, and host of host memory asleep (sleep.go).
	gpus             []int
	perGPU, residual uint64
	host             uint64
}

// New returns a runtime that starts command (for example
// []string{"/usr/bin/vgw", "fakevllm"}) and charges gpus.
func New(command []string, gpus *gpu.Declared) *Runtime {
	return &Runtime{command: command, gpus: gpus, exits: make(chan runtime.Exit, 64), procs: map[string]*proc{}}
}

// Exits reports every fake that stops.
func (r *Runtime) Exits() <-chan runtime.Exit { return r.exits }

// Adopt finds nothing: fake servers die with the vgw that started them.
func (r *Runtime) Adopt(context.Context) ([]*runtime.Instance, error) { return nil, nil }

// Start listens on a loopback port itself and hands the socket to the
// fake, so there is no race for the port and the fake serves from its
// first instant.
func (r *Runtime) Start(ctx context.Context, spec runtime.Spec) (*runtime.Instance, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("start %s: listen: %w", spec.Model, err)
	}
	defer lis.Close()
	f, err := lis.(*net.TCPListener).File()
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.Model, err)
	}
	defer f.Close()

	b := spec.Config.Sim // how the fake behaves
	args := append(r.command[1:len(r.command):len(r.command)],
		"--model", spec.Model, "--listen-fd", "3",
		"--startup-delay", b.StartupDelay.Std().String(),
		"--tokens-per-second", strconv.FormatFloat(b.TokensPerSecond, 'f', -1, 64),
		"--crash-after", strconv.Itoa(b.CrashAfter),
		"--crash-mid-stream", strconv.Itoa(b.CrashMidStream),
		"--slow-health", b.SlowHealth.Std().String(),
		"--sleep-delay", b.FallAsleep().String(),
		"--wake-delay", b.Wake().String())
	if b.FailStart {
		args = append(args, "--fail-start")
	}
	// The vLLM arguments, and the env, reach the fake as they would reach
	// vLLM, which logs its arguments as it starts.
	args = append(append(args, "--"), vllm.Args(spec.Model, spec.Config, spec.Utilization, spec.Sleep)...)
	cmd := exec.Command(r.command[0], args...)
	cmd.Env = os.Environ()
	for k, v := range spec.Env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.ExtraFiles = []*os.File{f}
	tail := runtime.NewLogTail(50)
	p := &proc{cmd: cmd, log: tail, done: make(chan struct{})}
	out := io.MultiWriter(tail, &p.follow) // one writer: exec copies to it from one goroutine
	cmd.Stdout, cmd.Stderr = out, out
	// The fake dies with vgw, as a sim model has nothing to outlive it for.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.Model, err)
	}
	pid := cmd.Process.Pid
	id := "sim-" + strconv.Itoa(pid)
	gpus := make([]int, len(spec.GPUs))
	for i, g := range spec.GPUs {
		gpus[i] = g.Index
	}
	p.gpus, p.perGPU, p.residual = gpus, spec.PerGPU, min(b.Residual(), spec.PerGPU)
	r.mu.Lock()
	r.procs[id] = p
	r.mu.Unlock()
	r.gpus.Charge(pid, gpus, spec.PerGPU)
	inst := &runtime.Instance{ID: id, Model: spec.Model, Addr: lis.Addr().String(), PIDs: []int{pid}, GPUs: gpus, Signature: spec.Signature, Launch: spec.Launch}
	go r.reap(inst, p)
	return inst, nil
}

// reap waits for the process, frees its memory and reports the exit.
func (r *Runtime) reap(inst *runtime.Instance, p *proc) {
	err := p.cmd.Wait()
	r.mu.Lock() // with the charge: a sleep or wake recharges under it
	r.gpus.Uncharge(inst.PIDs[0])
	delete(r.procs, inst.ID)
	stopping := p.stopping
	r.mu.Unlock()
	close(p.done)
	e := runtime.Exit{ID: inst.ID, Model: inst.Model, Reason: "exited", LogTail: p.log.String()}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		e.Code = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			e.Reason = "killed by " + ws.Signal().String()
		}
	}
	if stopping {
		e.Reason, e.Requested = "stopped", true
	}
	r.exits <- e
}

// FollowLog calls line for each line the fake writes from now (the sim
// keeps no log to go back to: since is not used) until ctx ends or the
// fake exits.
func (r *Runtime) FollowLog(ctx context.Context, inst *runtime.Instance, _ time.Time, line func(string)) error {
	r.mu.Lock()
	p, ok := r.procs[inst.ID]
	r.mu.Unlock()
	if !ok {
		return fmt.Errorf("sim: no fake %s", inst.ID)
	}
	stop := p.follow.Follow(line)
	defer stop()
	select {
	case <-ctx.Done():
	case <-p.done:
	}
	return nil
}

// PIDs is the fake's one process.
func (r *Runtime) PIDs(_ context.Context, inst *runtime.Instance) ([]int, error) {
	return inst.PIDs, nil
}

// Stop sends SIGTERM, waits up to grace, then SIGKILL.
func (r *Runtime) Stop(ctx context.Context, inst *runtime.Instance, grace time.Duration) error {
	r.mu.Lock()
	p, ok := r.procs[inst.ID]
	if ok {
		p.stopping = true
	}
	r.mu.Unlock()
	if !ok {
		return nil // already gone
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
		return nil
	case <-t.C:
	case <-ctx.Done():
	}
	p.cmd.Process.Kill()
	<-p.done
	return nil
}
