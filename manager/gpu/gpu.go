// Package gpu reads the machine's GPUs and their memory: through NVML on a
// GPU server (NVML), or from a declared list where vgw has no GPU to read
// (Declared, to which the sim runtime charges its fake servers' memory).
// The manager reads either through its Inventory.
package gpu

import (
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// GPU is one GPU of the machine.
type GPU struct {
	Index int
	UUID  string
	Name  string
	Total uint64 // bytes
}

// Memory is a live reading of one GPU's memory.
type Memory struct {
	Index int
	Used  uint64
	Total uint64
}

// Process is the GPU memory one process uses on one GPU.
type Process struct {
	PID  int
	GPU  int
	Used uint64
}

// NVML reads GPUs through NVML.
type NVML struct {
	lib     nvml.Interface
	devices []nvml.Device
	gpus    []GPU
}

// OpenNVML initialises NVML through lib (nvml.New() on a GPU box, one of
// go-nvml's mocks in tests) and lists the GPUs. When Init fails nothing
// else is called: after a failed Init, go-nvml's other calls reach a
// library that is not loaded and crash the process.
func OpenNVML(lib nvml.Interface) (*NVML, error) {
	if ret := lib.Init(); ret != nvml.SUCCESS {
		return nil, fmt.Errorf("initialise NVML: %w (is the NVIDIA driver installed and the GPU visible to this container?)", ret)
	}
	inv := &NVML{lib: lib}
	if err := inv.list(); err != nil {
		lib.Shutdown()
		return nil, err
	}
	return inv, nil
}

func (n *NVML) list() error {
	count, ret := n.lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return fmt.Errorf("count GPUs: %w", ret)
	}
	for i := range count {
		d, ret := n.lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			return fmt.Errorf("open GPU %d: %w", i, ret)
		}
		uuid, ret := d.GetUUID()
		if ret != nvml.SUCCESS {
			return fmt.Errorf("read the UUID of GPU %d: %w", i, ret)
		}
		name, ret := d.GetName()
		if ret != nvml.SUCCESS {
			return fmt.Errorf("read the name of GPU %d: %w", i, ret)
		}
		mem, ret := d.GetMemoryInfo()
		if ret != nvml.SUCCESS {
			return fmt.Errorf("read the memory of GPU %d: %w", i, ret)
		}
		n.devices = append(n.devices, d)
		n.gpus = append(n.gpus, GPU{Index: i, UUID: uuid, Name: name, Total: mem.Total})
	}
	if len(n.gpus) == 0 {
		return errors.New("NVML sees no GPU")
	}
	return nil
}

// Close shuts NVML down.
func (n *NVML) Close() error {
	if ret := n.lib.Shutdown(); ret != nvml.SUCCESS {
		return fmt.Errorf("shut NVML down: %w", ret)
	}
	return nil
}

// GPUs lists the GPUs as NVML numbers them.
func (n *NVML) GPUs() []GPU { return slices.Clone(n.gpus) }

// Memory reads every GPU's used and total memory now.
func (n *NVML) Memory() ([]Memory, error) {
	out := make([]Memory, 0, len(n.devices))
	for i, d := range n.devices {
		mem, ret := d.GetMemoryInfo()
		if ret != nvml.SUCCESS {
			return nil, fmt.Errorf("read the memory of GPU %d: %w", i, ret)
		}
		out = append(out, Memory{Index: i, Used: mem.Used, Total: mem.Total})
	}
	return out, nil
}

// Processes reads the GPU memory each process uses now. GPUs whose driver
// does not list processes are left out; from a container without the
// host's PID namespace the list may be empty.
func (n *NVML) Processes() ([]Process, error) {
	var out []Process
	for i, d := range n.devices {
		procs, ret := d.GetComputeRunningProcesses()
		if ret == nvml.ERROR_NOT_SUPPORTED {
			continue
		}
		if ret != nvml.SUCCESS {
			return nil, fmt.Errorf("list the processes of GPU %d: %w", i, ret)
		}
		for _, p := range procs {
			out = append(out, Process{PID: int(p.Pid), GPU: i, Used: p.UsedGpuMemory})
		}
	}
	return out, nil
}

// Declared is the inventory of declared GPUs, for the sim runtime and
// for machines vgw may not read. What runs is charged to it, so its
// readings move as a real GPU's would: the sim runtime charges each model
// server's memory while its process lives.
type Declared struct {
	gpus    []GPU
	mu      sync.Mutex
	charges map[int][]Process // by PID
}

// NewDeclared returns an inventory of the given GPUs, numbered in order.
func NewDeclared(gpus []GPU) *Declared {
	d := &Declared{charges: map[int][]Process{}}
	for i, g := range gpus {
		g.Index = i
		if g.UUID == "" {
			g.UUID = fmt.Sprintf("GPU-sim-%d", i)
		}
		d.gpus = append(d.gpus, g)
	}
	return d
}

// Charge records that process pid uses bytes on each of gpus.
func (d *Declared) Charge(pid int, gpus []int, bytes uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, g := range gpus {
		d.charges[pid] = append(d.charges[pid], Process{PID: pid, GPU: g, Used: bytes})
	}
}

// Uncharge forgets what process pid used, as when it exits.
func (d *Declared) Uncharge(pid int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.charges, pid)
}

// GPUs lists the declared GPUs.
func (d *Declared) GPUs() []GPU { return slices.Clone(d.gpus) }

// Memory is each GPU's total, and as used what is charged to it.
func (d *Declared) Memory() ([]Memory, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]Memory, len(d.gpus))
	for i, g := range d.gpus {
		out[i] = Memory{Index: i, Total: g.Total}
	}
	for _, cs := range d.charges {
		for _, c := range cs {
			if c.GPU >= 0 && c.GPU < len(out) {
				out[c.GPU].Used += c.Used
			}
		}
	}
	return out, nil
}

// Processes lists what is charged, by process.
func (d *Declared) Processes() ([]Process, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []Process
	for _, cs := range d.charges {
		out = append(out, cs...)
	}
	slices.SortFunc(out, func(a, b Process) int { return a.PID - b.PID })
	return out, nil
}
