package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/manager/gpu"
	"github.com/vgw-project/vgw/manager/runtime/docker"
	"github.com/vgw-project/vgw/manager/runtime/sim"
)

// The inventories and runtimes newMachine chooses from.
var (
	_ manager.Inventory = (*gpu.NVML)(nil)
	_ manager.Inventory = (*gpu.Declared)(nil)
	_ manager.Runtime   = (*docker.Runtime)(nil)
	_ manager.Runtime   = (*sim.Runtime)(nil)
)

// machine is the GPUs and the runtime a config asks for.
type machine struct {
	gpus    manager.Inventory
	runtime manager.Runtime
	close   func() // releases the GPUs (NVML)
}

// newMachine opens the GPUs (NVML, or the declared ones) and the runtime.
func newMachine(cfg *config.Config, log *slog.Logger) (*machine, error) {
	m := &machine{close: func() {}}
	var declared *gpu.Declared
	if cfg.GPUs.Auto {
		n, err := gpu.OpenNVML(nvml.New())
		if err != nil {
			return nil, err
		}
		m.gpus, m.close = n, func() { n.Close() }
	} else {
		var gs []gpu.GPU
		for _, g := range cfg.GPUs.Declared {
			gs = append(gs, gpu.GPU{Name: g.Name, Total: uint64(g.Memory)})
		}
		declared = gpu.NewDeclared(gs)
		m.gpus = declared
	}
	switch cfg.Runtime.Kind {
	case "sim":
		if declared == nil {
			m.close()
			return nil, errors.New("the sim runtime needs declared gpus, not auto")
		}
		command := cfg.Runtime.Fakevllm
		if len(command) == 0 {
			exe, err := os.Executable()
			if err != nil {
				m.close()
				return nil, fmt.Errorf("find the vgw binary for the sim runtime: %w", err)
			}
			command = []string{exe, "fakevllm"}
		}
		m.runtime = sim.New(command, declared)
	case "docker":
		rt, err := docker.New(dockerOptions(cfg, log))
		if err != nil {
			m.close()
			return nil, err
		}
		closeGPUs := m.close
		m.runtime, m.close = rt, func() { rt.Close(); closeGPUs() }
	default:
		m.close()
		return nil, fmt.Errorf("runtime.kind %q is not docker or sim", cfg.Runtime.Kind)
	}
	return m, nil
}

// dockerOptions are the Docker runtime's settings under cfg. GPUs are
// requested from Docker's NVIDIA driver only when they come from NVML:
// declared GPUs (a machine without one, or tests) have no devices to give.
// The Hugging Face token comes from vgw's environment, as the original
// gateway took it; a model's own env may set another.
func dockerOptions(cfg *config.Config, log *slog.Logger) docker.Options {
	env := map[string]string{}
	for _, k := range []string{"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} {
		if v := os.Getenv(k); v != "" {
			env[k] = v
		}
	}
	r := cfg.Runtime
	return docker.Options{
		Instance: r.Instance, Image: r.Image, Network: r.Network, CacheDir: r.CacheDir, ShmSize: int64(r.ShmSize),
		GPUDevices: cfg.GPUs.Auto, Env: env, Log: log,
	}
}

// newManager builds the GPU manager the config asks for, with its
// footprints file; onEvent hears its lifecycle events.
func newManager(cfg *config.Config, log *slog.Logger, onEvent func(manager.Event)) (*manager.Manager, func(), error) {
	fps, err := manager.OpenFootprints(cfg.FootprintsFile)
	if err != nil {
		return nil, nil, err
	}
	m, err := newMachine(cfg, log)
	if err != nil {
		return nil, nil, err
	}
	for _, g := range m.gpus.GPUs() {
		log.Info("GPU", slog.Int("index", g.Index), slog.String("name", g.Name), slog.String("uuid", g.UUID), slog.Uint64("memory_bytes", g.Total))
	}
	return manager.New(cfg, m.runtime, m.gpus, manager.Options{Log: log, Footprints: fps, OnEvent: onEvent}), m.close, nil
}
