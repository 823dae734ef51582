package manager

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"
)

const gb = 1 << 30

var t0 = time.Unix(1_700_000_000, 0)

// ago is a time d before now in these tables.
func ago(d time.Duration) time.Time { return t0.Add(-d) }

func gpus(totals ...uint64) []GPUState {
	var gs []GPUState
	for i, t := range totals {
		gs = append(gs, GPUState{Index: i, Total: t * gb})
	}
	return gs
}

// idle is a resident model, placed an hour ago and last used lastUsed ago.
func idle(model string, gpu int, size uint64, lastUsed time.Duration) Resident {
	return Resident{Model: model, GPUs: []int{gpu}, PerGPU: size * gb, Since: ago(time.Hour), LastUsed: ago(lastUsed)}
}

func with(r Resident, f func(*Resident)) Resident { f(&r); return r }

func TestPlace(t *testing.T) {
	tests := []struct {
		name      string
		state     Snapshot
		demand    Demand
		wantGPUs  []int
		wantEvict []string
		wantErr   string // a fragment of the NoRoom message
	}{
		{
			name:     "empty machine: the GPU with the most free memory",
			state:    Snapshot{GPUs: []GPUState{{Index: 0, Total: 40 * gb}, {Index: 1, Total: 80 * gb}}},
			demand:   Demand{Model: "m", PerGPU: 20 * gb},
			wantGPUs: []int{1},
		},
		{
			name:     "fits beside residents, on the emptier GPU",
			state:    Snapshot{GPUs: gpus(80, 80), Residents: []Resident{idle("a", 0, 30, time.Minute), idle("b", 1, 50, time.Minute)}},
			demand:   Demand{Model: "m", PerGPU: 20 * gb},
			wantGPUs: []int{0},
		},
		{
			name:     "external usage counts against a GPU",
			state:    Snapshot{GPUs: []GPUState{{Index: 0, Total: 80 * gb, External: 70 * gb}, {Index: 1, Total: 80 * gb}}, Residents: []Resident{idle("a", 1, 50, time.Minute)}},
			demand:   Demand{Model: "m", PerGPU: 20 * gb},
			wantGPUs: []int{1},
		},
		{
			name:      "LRU: the least recently used idle model goes",
			state:     Snapshot{GPUs: gpus(80), Residents: []Resident{idle("new", 0, 40, time.Minute), idle("old", 0, 40, time.Hour)}},
			demand:    Demand{Model: "m", PerGPU: 30 * gb},
			wantGPUs:  []int{0},
			wantEvict: []string{"old"},
		},
		{
			name: "never always_on",
			state: Snapshot{GPUs: gpus(80), Residents: []Resident{
				idle("recent", 0, 40, time.Minute),
				with(idle("pinned-on", 0, 40, time.Hour), func(r *Resident) { r.AlwaysOn = true }),
			}},
			demand:    Demand{Model: "m", PerGPU: 30 * gb},
			wantGPUs:  []int{0},
			wantEvict: []string{"recent"},
		},
		{
			name: "never one with requests in flight",
			state: Snapshot{GPUs: gpus(80), Residents: []Resident{
				idle("recent", 0, 40, time.Minute),
				with(idle("busy", 0, 40, time.Hour), func(r *Resident) { r.InFlight = 3 }),
			}},
			demand:    Demand{Model: "m", PerGPU: 30 * gb},
			wantGPUs:  []int{0},
			wantEvict: []string{"recent"},
		},
		{
			name: "never an operator-pinned or loading model",
			state: Snapshot{GPUs: gpus(80), Residents: []Resident{
				with(idle("pinned", 0, 40, time.Hour), func(r *Resident) { r.Pinned = true }),
				with(idle("loading", 0, 40, time.Hour), func(r *Resident) { r.Busy = true }),
			}},
			demand:  Demand{Model: "m", PerGPU: 30 * gb},
			wantErr: "pinned 40.0GiB (pinned), loading 40.0GiB (loading, waking or unloading)",
		},
		{
			name: "two-pass cooldown: an older model goes before a young one, even if more recently used",
			state: Snapshot{GPUs: gpus(80), MinResident: 90 * time.Second, Now: t0, Residents: []Resident{
				with(idle("young", 0, 40, time.Hour), func(r *Resident) { r.Since = ago(10 * time.Second) }),
				idle("settled", 0, 40, time.Minute),
			}},
			demand:    Demand{Model: "m", PerGPU: 30 * gb},
			wantGPUs:  []int{0},
			wantEvict: []string{"settled"},
		},
		{
			name: "two-pass cooldown: a young model goes when nothing else can",
			state: Snapshot{GPUs: gpus(80), MinResident: 90 * time.Second, Now: t0, Residents: []Resident{
				with(idle("young", 0, 40, time.Hour), func(r *Resident) { r.Since = ago(10 * time.Second) }),
				with(idle("on", 0, 40, time.Hour), func(r *Resident) { r.AlwaysOn = true }),
			}},
			demand:    Demand{Model: "m", PerGPU: 30 * gb},
			wantGPUs:  []int{0},
			wantEvict: []string{"young"},
		},
		{
			name: "fewer evictions win over LRU order across GPUs",
			state: Snapshot{GPUs: gpus(80, 80), Residents: []Resident{
				idle("a", 0, 30, 3*time.Hour), idle("b", 0, 30, 2*time.Hour),
				idle("c", 1, 60, time.Hour),
			}},
			demand:    Demand{Model: "m", PerGPU: 60 * gb},
			wantGPUs:  []int{1},
			wantEvict: []string{"c"},
		},
		{
			name: "evictions that turn out unneeded are kept",
			state: Snapshot{GPUs: gpus(80), Residents: []Resident{
				idle("small-old", 0, 10, 3*time.Hour), idle("big", 0, 60, 2*time.Hour),
			}},
			demand:    Demand{Model: "m", PerGPU: 60 * gb},
			wantGPUs:  []int{0},
			wantEvict: []string{"big"},
		},
		{
			name:      "max_models forces an eviction though memory fits",
			state:     Snapshot{GPUs: gpus(80), MaxModels: 2, Residents: []Resident{idle("a", 0, 10, time.Minute), idle("b", 0, 10, time.Hour)}},
			demand:    Demand{Model: "m", PerGPU: 10 * gb},
			wantGPUs:  []int{0},
			wantEvict: []string{"b"},
		},
		{
			name: "max_models with nothing evictable",
			state: Snapshot{GPUs: gpus(80), MaxModels: 1, Residents: []Resident{
				with(idle("a", 0, 10, time.Minute), func(r *Resident) { r.InFlight = 1 }),
			}},
			demand:  Demand{Model: "m", PerGPU: 10 * gb},
			wantErr: "max_models 1 are awake",
		},
		{
			name:     "tensor parallel takes two similar GPUs",
			state:    Snapshot{GPUs: []GPUState{{Index: 0, Total: 80 * gb}, {Index: 1, Total: 40 * gb}, {Index: 2, Total: 81 * gb}}},
			demand:   Demand{Model: "m", PerGPU: 30 * gb, TP: 2},
			wantGPUs: []int{0, 2},
		},
		{
			name:    "tensor parallel: each pair within 5%, the set too",
			state:   Snapshot{GPUs: []GPUState{{Index: 0, Total: 80 * gb}, {Index: 1, Total: 83 * gb}, {Index: 2, Total: 86 * gb}}},
			demand:  Demand{Model: "m", PerGPU: 30 * gb, TP: 3},
			wantErr: "no 3 GPUs of similar size",
		},
		{
			name:    "tensor parallel with no similar pair",
			state:   Snapshot{GPUs: []GPUState{{Index: 0, Total: 80 * gb}, {Index: 1, Total: 40 * gb}}},
			demand:  Demand{Model: "m", PerGPU: 30 * gb, TP: 2},
			wantErr: "no 2 GPUs of similar size",
		},
		{
			name: "tensor parallel evicts on both of its GPUs",
			state: Snapshot{GPUs: gpus(80, 80), Residents: []Resident{
				idle("a", 0, 60, time.Hour), idle("b", 1, 60, 2*time.Hour),
			}},
			demand:    Demand{Model: "m", PerGPU: 40 * gb, TP: 2},
			wantGPUs:  []int{0, 1},
			wantEvict: []string{"b", "a"},
		},
		{
			name: "a tensor-parallel resident frees memory on each of its GPUs",
			state: Snapshot{GPUs: gpus(80, 80), Residents: []Resident{
				{Model: "tp", GPUs: []int{0, 1}, PerGPU: 70 * gb, Since: ago(time.Hour), LastUsed: ago(time.Hour)},
			}},
			demand:    Demand{Model: "m", PerGPU: 40 * gb},
			wantGPUs:  []int{0},
			wantEvict: []string{"tp"},
		},
		{
			name:     "config pinning",
			state:    Snapshot{GPUs: gpus(80, 80, 80)},
			demand:   Demand{Model: "m", PerGPU: 40 * gb, Allowed: []int{2}},
			wantGPUs: []int{2},
		},
		{
			name:    "pinned to a GPU that does not exist",
			state:   Snapshot{GPUs: gpus(80)},
			demand:  Demand{Model: "m", PerGPU: 40 * gb, Allowed: []int{3}},
			wantErr: "pinned GPUs [3] do not all exist",
		},
		{
			name:    "too big for any GPU",
			state:   Snapshot{GPUs: []GPUState{{Index: 0, Total: 80 * gb, External: 2 * gb}}, Residents: []Resident{with(idle("a", 0, 20, time.Minute), func(r *Resident) { r.InFlight = 2 })}},
			demand:  Demand{Model: "huge", PerGPU: 90 * gb},
			wantErr: "cannot place huge (needs 90.0GiB): no GPU has room and not enough can be unloaded now; gpu0: 58.0GiB free of 80.0GiB, held by a 20.0GiB (2 in flight), other processes 2.0GiB",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkPlace(t, tt.state, tt.demand, Plan{GPUs: tt.wantGPUs, Evict: tt.wantEvict}, tt.wantErr)
		})
	}
}

// checkPlace places demand in state and checks the plan against want, or,
// with wantErr, that Place answered a NoRoom saying it.
func checkPlace(t *testing.T, state Snapshot, demand Demand, want Plan, wantErr string) {
	t.Helper()
	plan, err := Place(state, demand)
	if wantErr != "" {
		var nr *NoRoom
		if !errors.As(err, &nr) || !strings.Contains(err.Error(), wantErr) {
			t.Fatalf("Place = %+v, %v; want a NoRoom with %q", plan, err, wantErr)
		}
		return
	}
	if err != nil {
		t.Fatalf("Place: %v", err)
	}
	if !slices.Equal(plan.GPUs, want.GPUs) || !slices.Equal(plan.Sleep, want.Sleep) || !slices.Equal(plan.Evict, want.Evict) {
		t.Fatalf("Place = gpus %v sleep %v evict %v; want gpus %v sleep %v evict %v",
			plan.GPUs, plan.Sleep, plan.Evict, want.GPUs, want.Sleep, want.Evict)
	}
}

// TestPlaceIsPure: the same state gives the same plan, and the state is
// not changed.
func TestPlaceIsPure(t *testing.T) {
	s := Snapshot{GPUs: gpus(80, 80), Residents: []Resident{idle("a", 0, 60, time.Hour), idle("b", 1, 60, 2*time.Hour)}}
	before := slices.Clone(s.Residents)
	first, _ := Place(s, Demand{Model: "m", PerGPU: 40 * gb})
	for range 10 {
		p, _ := Place(s, Demand{Model: "m", PerGPU: 40 * gb})
		if !slices.Equal(p.GPUs, first.GPUs) || !slices.Equal(p.Evict, first.Evict) {
			t.Fatalf("plans differ: %+v then %+v", first, p)
		}
	}
	for i := range before {
		if before[i].Model != s.Residents[i].Model {
			t.Fatal("Place reordered the residents")
		}
	}
}
