package config

import (
	"strings"
	"testing"
	"time"
)

func TestSleep(t *testing.T) {
	const base = "runtime: {kind: sim}\ngpus: [{name: g, memory: 80GiB}]\n"
	tests := []struct {
		name     string
		yaml     string
		model    string
		want     Sleep
		level    int
		budget   uint64 // for a machine of 256 GiB
		fall     time.Duration
		wake     time.Duration
		residual uint64
	}{
		{"defaults", base + "models: {m: {}}\n", "m", SleepOff, 0, 192 << 30, DefaultSimSleepDelay, DefaultSimWakeDelay, DefaultSimResidualVRAM},
		{"gateway level1", base + "sleep: level1\nhost_memory: 100GiB\nmodels: {m: {}}\n", "m", SleepLevel1, 1, 100 << 30, DefaultSimSleepDelay, DefaultSimWakeDelay, DefaultSimResidualVRAM},
		{"model overrides", base + "sleep: level1\nmodels: {m: {sleep: level2}}\n", "m", SleepLevel2, 2, 192 << 30, DefaultSimSleepDelay, DefaultSimWakeDelay, DefaultSimResidualVRAM},
		{"model off under level1", base + "sleep: level1\nmodels: {m: {sleep: off}}\n", "m", SleepOff, 0, 192 << 30, DefaultSimSleepDelay, DefaultSimWakeDelay, DefaultSimResidualVRAM},
		{"host auto", base + "host_memory: auto\nsleep: level2\nmodels: {m: {}}\n", "m", SleepLevel2, 2, 192 << 30, DefaultSimSleepDelay, DefaultSimWakeDelay, DefaultSimResidualVRAM},
		{"level2 with no host memory", base + "host_memory: 0\nsleep: level2\nmodels: {m: {}}\n", "m", SleepLevel2, 2, 0, DefaultSimSleepDelay, DefaultSimWakeDelay, DefaultSimResidualVRAM},
		{"sim figures", base + "models:\n  m:\n    sleep: level1\n    sim: {sleep_delay: 0s, wake_delay: 250ms, residual_vram: 1GiB}\n", "m", SleepLevel1, 1, 192 << 30, 0, 250 * time.Millisecond, 1 << 30},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse("c.yaml", []byte(tt.yaml))
			if err != nil {
				t.Fatal(err)
			}
			s := c.SleepOf(tt.model)
			if s != tt.want || s.Level() != tt.level {
				t.Errorf("sleep %q level %d, want %q level %d", s, s.Level(), tt.want, tt.level)
			}
			if got := c.HostMemory.Budget(256 << 30); got != tt.budget {
				t.Errorf("host budget %d, want %d", got, tt.budget)
			}
			sim := c.Models[tt.model].Sim
			if sim.FallAsleep() != tt.fall || sim.Wake() != tt.wake || sim.Residual() != tt.residual {
				t.Errorf("sim %v %v %d, want %v %v %d", sim.FallAsleep(), sim.Wake(), sim.Residual(), tt.fall, tt.wake, tt.residual)
			}
		})
	}
}

func TestSleepErrors(t *testing.T) {
	const base = "runtime: {kind: sim}\ngpus: [{name: g, memory: 80GiB}]\n"
	tests := []struct {
		name, yaml, want string
	}{
		{"bad level", base + "sleep: deep\nmodels: {m: {}}\n", "c.yaml:3: sleep must be off, level1 or level2"},
		{"bad model level", base + "models:\n  m:\n    sleep: 1\n", "c.yaml:5: sleep must be off, level1 or level2"},
		{"bad host memory", base + "host_memory: lots\nmodels: {m: {}}\n", "c.yaml:3: host_memory must be auto or a memory size"},
		{"level1 without host memory", base + "host_memory: 0\nmodels:\n  m: {sleep: level1}\n", "c.yaml:3: host_memory is 0, so model \"m\" cannot sleep at level1"},
		{"negative sim delay", base + "models:\n  m:\n    sim: {wake_delay: -1s}\n", "c.yaml:5: sim settings must not be negative"},
		{"residual over vram", base + "models:\n  m:\n    vram: 1GiB\n    sim: {residual_vram: 2GiB}\n", "c.yaml:6: sim.residual_vram 2GiB must be less than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("c.yaml", []byte(tt.yaml))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want %q", err, tt.want)
			}
		})
	}
}

func TestHostMemoryAuto(t *testing.T) {
	for _, tt := range []struct{ total, want uint64 }{
		{0, 0},
		{16 << 30, 0},
		{32 << 30, 16 << 30},
		{64 << 30, 48 << 30},
		{2 << 40, 1536 << 30},
	} {
		if got := HostMemoryAuto(tt.total); got != tt.want {
			t.Errorf("HostMemoryAuto(%d) = %d, want %d", tt.total, got, tt.want)
		}
	}
}
