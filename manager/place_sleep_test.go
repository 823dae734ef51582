package manager

import (
	"slices"
	"testing"
	"time"
)

// sleepy is an idle awake model whose server can sleep, keeping 2 GiB of
// its GPU and host of host memory asleep.
func sleepy(model string, gpu int, size uint64, lastUsed time.Duration, host uint64) Resident {
	return with(idle(model, gpu, size, lastUsed), func(r *Resident) {
		r.CanSleep, r.Residual, r.SleepHost = true, 2*gb, host*gb
	})
}

// asleep is a sleeping model holding 2 GiB of its GPU and host of host
// memory.
func asleep(model string, gpu int, lastUsed time.Duration, host uint64) Resident {
	return with(idle(model, gpu, 2, lastUsed), func(r *Resident) { r.Asleep, r.Host = true, host*gb })
}

// TestPlaceTiers: awake and sleeping models form one LRU; an awake model
// put down sleeps when its server can and host memory has room, made by
// stopping only sleepers used less recently than it.
func TestPlaceTiers(t *testing.T) {
	tests := []struct {
		name      string
		state     Snapshot
		demand    Demand
		wantGPUs  []int
		wantSleep []string
		wantEvict []string
		wantErr   string
	}{
		{
			name:      "put to sleep rather than stopped",
			state:     Snapshot{GPUs: gpus(80), HostBudget: 100 * gb, Residents: []Resident{sleepy("old", 0, 60, time.Hour, 20)}},
			demand:    Demand{Model: "m", PerGPU: 30 * gb},
			wantGPUs:  []int{0},
			wantSleep: []string{"old"},
		},
		{
			name:      "stopped when host memory has no room for it",
			state:     Snapshot{GPUs: gpus(80), HostBudget: 10 * gb, Residents: []Resident{sleepy("old", 0, 60, time.Hour, 20)}},
			demand:    Demand{Model: "m", PerGPU: 30 * gb},
			wantGPUs:  []int{0},
			wantEvict: []string{"old"},
		},
		{
			name:      "stopped when its residual leaves too little",
			state:     Snapshot{GPUs: gpus(80), HostBudget: 100 * gb, Residents: []Resident{sleepy("old", 0, 60, time.Hour, 20)}},
			demand:    Demand{Model: "m", PerGPU: 79 * gb},
			wantGPUs:  []int{0},
			wantEvict: []string{"old"},
		},
		{
			name: "host room made by stopping an older sleeper",
			state: Snapshot{GPUs: gpus(80, 80), HostBudget: 60 * gb, Residents: []Resident{
				asleep("older", 1, 2*time.Hour, 50), sleepy("old", 0, 60, time.Hour, 40),
			}},
			demand:    Demand{Model: "m", PerGPU: 70 * gb, Allowed: []int{0}},
			wantGPUs:  []int{0},
			wantSleep: []string{"old"},
			wantEvict: []string{"older"},
		},
		{
			name: "a sleeper used more recently is not stopped for an older model's sleep",
			state: Snapshot{GPUs: gpus(80, 80), HostBudget: 60 * gb, Residents: []Resident{
				asleep("newer", 1, time.Minute, 50), sleepy("old", 0, 60, time.Hour, 40),
			}},
			demand:    Demand{Model: "m", PerGPU: 70 * gb, Allowed: []int{0}},
			wantGPUs:  []int{0},
			wantEvict: []string{"old"},
		},
		{
			name: "sleepers on the GPU go before an awake model, when their residuals are enough",
			state: Snapshot{GPUs: gpus(80), HostBudget: 100 * gb, Residents: []Resident{
				sleepy("a", 0, 70, time.Minute, 10), asleep("s1", 0, 2*time.Hour, 10), asleep("s2", 0, 3*time.Hour, 10),
			}},
			demand:    Demand{Model: "m", PerGPU: 9 * gb},
			wantGPUs:  []int{0},
			wantEvict: []string{"s2", "s1"},
		},
		{
			name: "only the sleepers needed are stopped",
			state: Snapshot{GPUs: gpus(80), HostBudget: 100 * gb, Residents: []Resident{
				sleepy("a", 0, 70, time.Minute, 10), asleep("s1", 0, 2*time.Hour, 10), asleep("s2", 0, 3*time.Hour, 10),
			}},
			demand:    Demand{Model: "m", PerGPU: 7 * gb},
			wantGPUs:  []int{0},
			wantEvict: []string{"s2"},
		},
		{
			name: "a wake stays on its GPU, and needs its footprint less its residual",
			state: Snapshot{GPUs: gpus(80, 80), HostBudget: 50 * gb, Residents: []Resident{
				asleep("m", 1, time.Hour, 20), sleepy("b", 1, 60, 2*time.Hour, 30),
			}},
			demand:    Demand{Model: "m", PerGPU: 40 * gb},
			wantGPUs:  []int{1},
			wantSleep: []string{"b"},
		},
		{
			name: "a wake holds its host memory until awake: a neighbour that cannot sleep beside it stops",
			state: Snapshot{GPUs: gpus(80, 80), HostBudget: 49 * gb, Residents: []Resident{
				asleep("m", 1, time.Hour, 20), sleepy("b", 1, 60, 2*time.Hour, 30),
			}},
			demand:    Demand{Model: "m", PerGPU: 40 * gb},
			wantGPUs:  []int{1},
			wantEvict: []string{"b"},
		},
		{
			name: "a wake that fits beside its neighbours puts nobody down",
			state: Snapshot{GPUs: gpus(80), HostBudget: 40 * gb, Residents: []Resident{
				asleep("m", 0, time.Hour, 20), sleepy("b", 0, 30, 2*time.Hour, 30),
			}},
			demand:   Demand{Model: "m", PerGPU: 50 * gb},
			wantGPUs: []int{0},
		},
		{
			name: "max_models counts the awake only",
			state: Snapshot{GPUs: gpus(80), HostBudget: 100 * gb, MaxModels: 1, Residents: []Resident{
				asleep("s", 0, time.Hour, 10), sleepy("a", 0, 10, time.Minute, 10),
			}},
			demand:    Demand{Model: "m", PerGPU: 10 * gb},
			wantGPUs:  []int{0},
			wantSleep: []string{"a"},
		},
		{
			name: "a waking model is not put down",
			state: Snapshot{GPUs: gpus(80), HostBudget: 100 * gb, Residents: []Resident{
				with(asleep("w", 0, time.Hour, 10), func(r *Resident) { r.Busy, r.PerGPU = true, 78*gb }),
			}},
			demand:  Demand{Model: "m", PerGPU: 10 * gb},
			wantErr: "held by w 78.0GiB (loading, waking or unloading)",
		},
		{
			name: "an always_on model is not put to sleep",
			state: Snapshot{GPUs: gpus(80), HostBudget: 100 * gb, Residents: []Resident{
				with(sleepy("on", 0, 70, time.Hour, 10), func(r *Resident) { r.AlwaysOn = true }),
			}},
			demand:  Demand{Model: "m", PerGPU: 20 * gb},
			wantErr: "held by on 70.0GiB (always_on)",
		},
		{
			name: "past its budget already, host memory may not grow",
			state: Snapshot{GPUs: gpus(80, 80), HostBudget: 10 * gb, Residents: []Resident{
				asleep("s", 1, time.Minute, 30), sleepy("old", 0, 60, time.Hour, 5),
			}},
			demand:    Demand{Model: "m", PerGPU: 70 * gb, Allowed: []int{0}},
			wantGPUs:  []int{0},
			wantEvict: []string{"old"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.state.Now = t0
			checkPlace(t, tt.state, tt.demand, Plan{GPUs: tt.wantGPUs, Sleep: tt.wantSleep, Evict: tt.wantEvict}, tt.wantErr)
		})
	}
}

// TestSleepOrStop: an idle model sleeps when host memory has room, made
// by stopping older sleepers only.
func TestSleepOrStop(t *testing.T) {
	tests := []struct {
		name      string
		state     Snapshot
		model     string
		wantSleep bool
		wantStop  []string
	}{
		{"room", Snapshot{HostBudget: 50 * gb, Residents: []Resident{sleepy("a", 0, 40, time.Hour, 20)}}, "a", true, nil},
		{"no sleep mode", Snapshot{HostBudget: 50 * gb, Residents: []Resident{idle("a", 0, 40, time.Hour)}}, "a", false, nil},
		{"an older sleeper makes room", Snapshot{HostBudget: 50 * gb, Residents: []Resident{
			sleepy("a", 0, 40, time.Hour, 20), asleep("s", 1, 2*time.Hour, 40),
		}}, "a", true, []string{"s"}},
		{"a newer sleeper does not", Snapshot{HostBudget: 50 * gb, Residents: []Resident{
			sleepy("a", 0, 40, time.Hour, 20), asleep("s", 1, time.Minute, 40),
		}}, "a", false, nil},
		{"level 2: no host memory needed", Snapshot{HostBudget: 0, Residents: []Resident{sleepy("a", 0, 40, time.Hour, 0)}}, "a", true, nil},
		{"unknown model", Snapshot{HostBudget: 50 * gb}, "x", false, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.state.Now, tt.state.GPUs = t0, gpus(80, 80)
			stop, sleep := SleepOrStop(tt.state, tt.model)
			if sleep != tt.wantSleep || !slices.Equal(stop, tt.wantStop) {
				t.Fatalf("SleepOrStop = %v, %v; want %v, %v", stop, sleep, tt.wantStop, tt.wantSleep)
			}
		})
	}
}

// TestOverHost: past the budget, the least recently used sleepers stop
// until what is left fits.
func TestOverHost(t *testing.T) {
	s := Snapshot{Now: t0, GPUs: gpus(80, 80), HostBudget: 40 * gb, Residents: []Resident{
		asleep("new", 0, time.Minute, 30), asleep("old", 1, time.Hour, 30), asleep("older", 1, 2*time.Hour, 5),
		with(asleep("pinned", 1, 3*time.Hour, 1), func(r *Resident) { r.Pinned = true }),
	}}
	if got := OverHost(s); !slices.Equal(got, []string{"older", "old"}) {
		t.Fatalf("OverHost = %v, want [older old]", got)
	}
	s.HostBudget = 100 * gb
	if got := OverHost(s); got != nil {
		t.Fatalf("within budget: OverHost = %v", got)
	}
}
