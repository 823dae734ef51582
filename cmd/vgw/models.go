package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/manager"
)

// machine is the GPUs and the runtime a config asks for.
type machine struct {
	gpus    manager.Inventory
	runtime manager.Runtime
	close   func() // releases the GPUs (NVML)
}

// newMachine opens the GPUs (NVML, or the declared ones) and the runtime.
func newMachine(cfg *config.Config) (*machine, error) {
	m := &machine{close: func() {}}
	var declared *manager.DeclaredGPUs
	if cfg.GPUs.Auto {
		n, err := manager.OpenNVML(nvml.New())
		if err != nil {
			return nil, err
		}
		m.gpus, m.close = n, func() { n.Close() }
	} else {
		var gs []manager.GPU
		for _, g := range cfg.GPUs.Declared {
			gs = append(gs, manager.GPU{Name: g.Name, Total: uint64(g.Memory)})
		}
		declared = manager.NewDeclaredGPUs(gs)
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
		m.runtime = manager.NewSimRuntime(command, declared)
	default:
		m.close()
		return nil, fmt.Errorf("runtime %q is not available in this build yet; use runtime.kind: sim", cfg.Runtime.Kind)
	}
	return m, nil
}

// newManager builds the GPU manager the config asks for, with its
// footprints file.
func newManager(cfg *config.Config, log *slog.Logger) (*manager.Manager, func(), error) {
	fps, err := manager.OpenFootprints(cfg.FootprintsFile)
	if err != nil {
		return nil, nil, err
	}
	m, err := newMachine(cfg)
	if err != nil {
		return nil, nil, err
	}
	for _, g := range m.gpus.GPUs() {
		log.Info("GPU", slog.Int("index", g.Index), slog.String("name", g.Name), slog.String("uuid", g.UUID), slog.Uint64("memory_bytes", g.Total))
	}
	return manager.New(cfg, m.runtime, m.gpus, manager.Options{Log: log, Footprints: fps}), m.close, nil
}

// routes adapts the manager to what extproc needs: a resident model's
// cluster, the wait for a cold one, and the end of each request.
type routes struct {
	mgr      *manager.Manager
	clusters atomic.Pointer[map[string]extproc.Route]
}

func newRoutes(mgr *manager.Manager, cfg *config.Config) *routes {
	r := &routes{mgr: mgr}
	r.set(cfg)
	return r
}

// set builds the model → cluster table once per config, so the request
// path builds no names.
func (r *routes) set(cfg *config.Config) {
	m := make(map[string]extproc.Route, len(cfg.Models))
	for name := range cfg.Models {
		m[name] = extproc.Route{Cluster: ClusterName(name)}
	}
	r.clusters.Store(&m)
}

// ClusterName is the Envoy cluster that serves a model.
func ClusterName(model string) string { return "model/" + model }

func (r *routes) route(model string) (extproc.Route, bool) {
	rt, ok := (*r.clusters.Load())[model]
	if !ok {
		r.mgr.Release(model)
	}
	return rt, ok
}

// Route counts the request in with the manager when the model is ready.
func (r *routes) Route(model string) (extproc.Route, bool) {
	if !r.mgr.Acquire(model) {
		return extproc.Route{}, false
	}
	return r.route(model)
}

// Ensure loads the model if need be and counts the request in.
func (r *routes) Ensure(ctx context.Context, model string) (extproc.Route, error) {
	err := r.mgr.Ensure(ctx, model)
	if errors.Is(err, manager.ErrUnknownModel) {
		return extproc.Route{}, fmt.Errorf("%w: %w", extproc.ErrModelNotFound, err)
	}
	if err != nil {
		return extproc.Route{}, err
	}
	if rt, ok := r.route(model); ok {
		return rt, nil
	}
	return extproc.Route{}, fmt.Errorf("%w: %s", extproc.ErrModelNotFound, model)
}

// Observe counts the request out.
func (r *routes) Observe(model string, _ extproc.Result) { r.mgr.Release(model) }
