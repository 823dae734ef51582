package manager

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

// GPUMemory is a live reading of one GPU's memory.
type GPUMemory struct {
	Index int
	Used  uint64
	Total uint64
}

// ProcessMemory is the GPU memory one process uses on one GPU.
type ProcessMemory struct {
	PID  int
	GPU  int
	Used uint64
}

// Inventory reads the machine's GPUs: NVML on a GPU box, a declared list
// for the sim runtime.
type Inventory interface {
	GPUs() []GPU
	// Memory reads every GPU's used and total memory now.
	Memory() ([]GPUMemory, error)
	// Processes reads the GPU memory each process uses now. It may be
	// empty where the driver does not say (no host PID namespace).
	Processes() ([]ProcessMemory, error)
}

// NVMLInventory reads GPUs through NVML.
type NVMLInventory struct {
	lib     nvml.Interface
	devices []nvml.Device
	gpus    []GPU
}

var _ Inventory = (*NVMLInventory)(nil)

// OpenNVML initialises NVML through lib (nvml.New() on a GPU box, one of
// go-nvml's mocks in tests) and lists the GPUs. When Init fails nothing
// else is called: after a failed Init, go-nvml's other calls reach a
// library that is not loaded and crash the process.
func OpenNVML(lib nvml.Interface) (*NVMLInventory, error) {
	if ret := lib.Init(); ret != nvml.SUCCESS {
		return nil, fmt.Errorf("initialise NVML: %w (is the NVIDIA driver installed and the GPU visible to this container?)", ret)
	}
	inv := &NVMLInventory{lib: lib}
	if err := inv.list(); err != nil {
		lib.Shutdown()
		return nil, err
	}
	return inv, nil
}

func (n *NVMLInventory) list() error {
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
func (n *NVMLInventory) Close() error {
	if ret := n.lib.Shutdown(); ret != nvml.SUCCESS {
		return fmt.Errorf("shut NVML down: %w", ret)
	}
	return nil
}

func (n *NVMLInventory) GPUs() []GPU { return slices.Clone(n.gpus) }

func (n *NVMLInventory) Memory() ([]GPUMemory, error) {
	out := make([]GPUMemory, 0, len(n.devices))
	for i, d := range n.devices {
		mem, ret := d.GetMemoryInfo()
		if ret != nvml.SUCCESS {
			return nil, fmt.Errorf("read the memory of GPU %d: %w", i, ret)
		}
		out = append(out, GPUMemory{Index: i, Used: mem.Used, Total: mem.Total})
	}
	return out, nil
}

func (n *NVMLInventory) Processes() ([]ProcessMemory, error) {
	var out []ProcessMemory
	for i, d := range n.devices {
		procs, ret := d.GetComputeRunningProcesses()
		if ret == nvml.ERROR_NOT_SUPPORTED {
			continue
		}
		if ret != nvml.SUCCESS {
			return nil, fmt.Errorf("list the processes of GPU %d: %w", i, ret)
		}
		for _, p := range procs {
			out = append(out, ProcessMemory{PID: int(p.Pid), GPU: i, Used: p.UsedGpuMemory})
		}
	}
	return out, nil
}

// DeclaredGPUs is the inventory of declared GPUs, for the sim runtime and
// for machines vgw may not read. What runs is charged to it, so its
// readings move as a real GPU's would: the sim runtime charges each model
// server's memory while its process lives.
type DeclaredGPUs struct {
	gpus    []GPU
	mu      sync.Mutex
	charges map[int][]ProcessMemory // by PID
}

var _ Inventory = (*DeclaredGPUs)(nil)

// NewDeclaredGPUs returns an inventory of the given GPUs, numbered in order.
func NewDeclaredGPUs(gpus []GPU) *DeclaredGPUs {
	d := &DeclaredGPUs{charges: map[int][]ProcessMemory{}}
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
func (d *DeclaredGPUs) Charge(pid int, gpus []int, bytes uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, g := range gpus {
		d.charges[pid] = append(d.charges[pid], ProcessMemory{PID: pid, GPU: g, Used: bytes})
	}
}

// Release forgets what process pid used, as when it exits.
func (d *DeclaredGPUs) Release(pid int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.charges, pid)
}

func (d *DeclaredGPUs) GPUs() []GPU { return slices.Clone(d.gpus) }

func (d *DeclaredGPUs) Memory() ([]GPUMemory, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]GPUMemory, len(d.gpus))
	for i, g := range d.gpus {
		out[i] = GPUMemory{Index: i, Total: g.Total}
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

func (d *DeclaredGPUs) Processes() ([]ProcessMemory, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []ProcessMemory
	for _, cs := range d.charges {
		out = append(out, cs...)
	}
	slices.SortFunc(out, func(a, b ProcessMemory) int { return a.PID - b.PID })
	return out, nil
}
