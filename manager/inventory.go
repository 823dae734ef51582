package manager

import "github.com/vgw-project/vgw/manager/gpu"

// Inventory reads the machine's GPUs: NVML on a GPU box (gpu.NVML), a
// declared list for the sim runtime (gpu.Declared).
type Inventory interface {
	GPUs() []gpu.GPU
	// Memory reads every GPU's used and total memory now.
	Memory() ([]gpu.Memory, error)
	// Processes reads the GPU memory each process uses now. It may be
	// empty where the driver does not say (no host PID namespace).
	Processes() ([]gpu.Process, error)
}
