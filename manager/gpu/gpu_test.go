package gpu

import (
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
)

func TestNVML(t *testing.T) {
	for _, tc := range []struct {
		name  string
		lib   nvml.Interface
		gpus  int
		total uint64
		model string
	}{
		{"dgxa100", dgxa100.New(), 8, 40 << 30, "A100"},
		{"dgxh100", dgxh100.New(), 8, 80 << 30, "H100"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inv, err := OpenNVML(tc.lib)
			if err != nil {
				t.Fatal(err)
			}
			defer inv.Close()
			gs := inv.GPUs()
			if len(gs) != tc.gpus {
				t.Fatalf("%d GPUs, want %d", len(gs), tc.gpus)
			}
			for i, g := range gs {
				if g.Index != i || !strings.HasPrefix(g.UUID, "GPU-") || !strings.Contains(g.Name, tc.model) {
					t.Errorf("gpu %d: %+v", i, g)
				}
				// Within a few percent: NVML reports usable memory.
				if g.Total < tc.total*9/10 || g.Total > tc.total*11/10 {
					t.Errorf("gpu %d: total %d, want about %d", i, g.Total, tc.total)
				}
			}
			mem, err := inv.Memory()
			if err != nil || len(mem) != tc.gpus || mem[0].Total != gs[0].Total {
				t.Fatalf("memory %+v, %v", mem, err)
			}
		})
	}
}

// TestNVMLProcesses attributes memory to processes, and tolerates GPUs
// whose driver does not list them.
func TestNVMLProcesses(t *testing.T) {
	lib := dgxa100.New()
	devs := lib.Devices
	devs[0].(*server.Device).GetComputeRunningProcessesFunc = func() ([]nvml.ProcessInfo, nvml.Return) {
		return []nvml.ProcessInfo{{Pid: 4242, UsedGpuMemory: 20 << 30}, {Pid: 77, UsedGpuMemory: 1 << 30}}, nvml.SUCCESS
	}
	for _, d := range devs[1:] {
		d.(*server.Device).GetComputeRunningProcessesFunc = func() ([]nvml.ProcessInfo, nvml.Return) {
			return nil, nvml.ERROR_NOT_SUPPORTED
		}
	}
	inv, err := OpenNVML(lib)
	if err != nil {
		t.Fatal(err)
	}
	ps, err := inv.Processes()
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 2 || ps[0] != (Process{PID: 4242, GPU: 0, Used: 20 << 30}) {
		t.Fatalf("processes %+v", ps)
	}
}

// TestNVMLInitFails: a failed Init is reported, and nothing else in NVML
// is called after it (go-nvml's calls crash the process then).
func TestNVMLInitFails(t *testing.T) {
	calls := 0
	lib := &mock.Interface{
		InitFunc: func() nvml.Return { return nvml.ERROR_LIBRARY_NOT_FOUND },
		DeviceGetCountFunc: func() (int, nvml.Return) {
			calls++
			return 0, nvml.SUCCESS
		},
		ShutdownFunc: func() nvml.Return {
			calls++
			return nvml.SUCCESS
		},
	}
	_, err := OpenNVML(lib)
	if err == nil || !strings.Contains(err.Error(), "ERROR_LIBRARY_NOT_FOUND") {
		t.Fatalf("OpenNVML = %v, want the Init failure", err)
	}
	if calls != 0 {
		t.Fatalf("%d NVML calls after a failed Init", calls)
	}
}

func TestDeclared(t *testing.T) {
	d := NewDeclared([]GPU{{Name: "sim0", Total: 80 << 30}, {Name: "sim1", Total: 80 << 30}})
	d.Charge(100, []int{0}, 20<<30)
	d.Charge(200, []int{0, 1}, 30<<30)
	mem, _ := d.Memory()
	if mem[0].Used != 50<<30 || mem[1].Used != 30<<30 {
		t.Fatalf("memory %+v", mem)
	}
	ps, _ := d.Processes()
	if len(ps) != 3 || ps[0].PID != 100 {
		t.Fatalf("processes %+v", ps)
	}
	d.Uncharge(200)
	mem, _ = d.Memory()
	if mem[0].Used != 20<<30 || mem[1].Used != 0 {
		t.Fatalf("after release: %+v", mem)
	}
	if g := d.GPUs(); g[1].Index != 1 || g[1].UUID != "GPU-sim-1" {
		t.Fatalf("gpus %+v", g)
	}
}
