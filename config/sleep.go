package config

import (
	"time"

	"github.com/goccy/go-yaml/ast"
)

// Sleep is how a model leaves its GPUs when it must make room or has been
// idle: stopped (off), or put to sleep in its running server (vLLM's sleep
// mode), which keeps the server and gives back most of its GPU memory.
// Level 1 moves the weights to host memory and wakes in seconds; level 2
// drops them and reloads them from disk on waking, slower than level 1
// but with no host memory to hold, and still far faster than a cold start.
type Sleep string

// The values of Sleep.
const (
	SleepOff    Sleep = "off"
	SleepLevel1 Sleep = "level1"
	SleepLevel2 Sleep = "level2"
)

// Level is vLLM's number for the level: 0 for off, else 1 or 2.
func (s Sleep) Level() int {
	switch s {
	case SleepLevel1:
		return 1
	case SleepLevel2:
		return 2
	}
	return 0
}

// UnmarshalYAML implements yaml.NodeUnmarshaler: off, level1 or level2.
func (s *Sleep) UnmarshalYAML(n ast.Node) error {
	v, ok := scalar(n)
	if b, isBool := n.(*ast.BoolNode); isBool && !b.Value {
		v, ok = "off", true // YAML 1.1 reads a bare off as false
	}
	switch Sleep(v) {
	case SleepOff, SleepLevel1, SleepLevel2:
		if ok {
			*s = Sleep(v)
			return nil
		}
	}
	return nodeError(n, "sleep must be off, level1 or level2, got %s", n.GetToken().Value)
}

// HostMemory is the host memory that sleeping models may hold: a size,
// or auto, which is the machine's memory less a reserve for everything
// else (see HostMemoryAuto).
type HostMemory struct {
	Auto  bool
	Bytes Bytes
}

// UnmarshalYAML implements yaml.NodeUnmarshaler: auto or a memory size.
func (h *HostMemory) UnmarshalYAML(n ast.Node) error {
	if s, ok := scalar(n); ok && s == "auto" {
		*h = HostMemory{Auto: true}
		return nil
	}
	var b Bytes
	if err := b.UnmarshalYAML(n); err != nil {
		return nodeError(n, "host_memory must be auto or a memory size such as 256GiB, got %s", n.GetToken().Value)
	}
	*h = HostMemory{Bytes: b}
	return nil
}

// String is host_memory as configured: auto, or the size.
func (h HostMemory) String() string {
	if h.Auto {
		return "auto"
	}
	return h.Bytes.String()
}

// Budget is the host memory sleeping models may hold on a machine with
// total bytes of memory.
func (h HostMemory) Budget(total uint64) uint64 {
	if !h.Auto {
		return uint64(h.Bytes)
	}
	return HostMemoryAuto(total)
}

// HostMemoryAuto is host_memory: auto on a machine with total bytes: all
// of it but a reserve of a quarter, and at least 16 GiB, for what else
// runs there: vgw, Docker, and the awake vLLM servers, each of which
// holds several GiB of host memory of its own (Python, CUDA, pinned
// buffers) that the budget does not count.
func HostMemoryAuto(total uint64) uint64 {
	reserve := max(total/4, 16<<30)
	if total <= reserve {
		return 0
	}
	return total - reserve
}

// SleepOf resolves the sleep setting of the model called name.
func (c *Config) SleepOf(name string) Sleep { return c.SleepFor(c.Models[name]) }

// SleepFor resolves m's sleep setting: its own, else the gateway's.
func (c *Config) SleepFor(m *Model) Sleep {
	if m != nil && m.Sleep != "" {
		return m.Sleep
	}
	return c.Sleep
}

// The sim runtime's sleep figures when a model sets none: a level-1 wake
// of vLLM 0.11 takes 0.26 s for a 0.6B model and 3-6 s for large ones, a
// level-2 wake 0.85-2.6 s, and a sleeping server keeps about 1.2-1.4 GiB
// of its GPU (the vLLM blog's "sleep mode" post of 2025-10-26).
const (
	DefaultSimSleepDelay   = time.Second
	DefaultSimWakeDelay    = 2 * time.Second
	DefaultSimResidualVRAM = 1300 << 20
)

// FallAsleep is how long the model's fake takes to fall asleep.
func (s Sim) FallAsleep() time.Duration {
	return deref(s.SleepDelay, Duration(DefaultSimSleepDelay)).Std()
}

// Wake is how long the model's fake takes to bring its weights back.
func (s Sim) Wake() time.Duration { return deref(s.WakeDelay, Duration(DefaultSimWakeDelay)).Std() }

// Residual is the GPU memory the model's fake keeps on each of its GPUs
// while asleep.
func (s Sim) Residual() uint64 { return uint64(deref(s.ResidualVRAM, Bytes(DefaultSimResidualVRAM))) }

func (v *validator) sleep(c *Config) {
	for _, name := range c.ModelNames() {
		m := c.Models[name]
		if m == nil {
			continue
		}
		for _, d := range []*Duration{m.Sim.SleepDelay, m.Sim.WakeDelay} {
			if d != nil && *d < 0 {
				v.at([]string{"models", name, "sim"}, "sim settings must not be negative")
			}
		}
		if r := m.Sim.ResidualVRAM; r != nil && m.VRAM > 0 && int64(*r) >= int64(m.VRAM)/int64(max(m.TensorParallelSize, 1)) {
			v.at([]string{"models", name, "sim", "residual_vram"}, "sim.residual_vram %v must be less than the model's vram on each GPU", *r)
		}
	}
	if !c.HostMemory.Auto && c.HostMemory.Bytes == 0 {
		for _, name := range c.ModelNames() {
			if c.SleepOf(name) == SleepLevel1 {
				v.at([]string{"host_memory"}, "host_memory is 0, so model %s cannot sleep at level1 (set host_memory, or sleep: level2, which holds no host memory)", trimmed(name))
				break
			}
		}
	}
}
