package manager

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"time"
)

// GPUState is one GPU as placement sees it.
type GPUState struct {
	Index int
	Total uint64 // bytes
	// External is memory in use that no model of vgw's accounts for: other
	// processes, the driver, a model still freeing its memory.
	External uint64
}

// Resident is a model that holds GPU memory: loaded, loading, or being
// unloaded.
type Resident struct {
	Model    string
	GPUs     []int
	PerGPU   uint64    // its footprint on each of its GPUs
	Since    time.Time // when it was placed; see Snapshot.MinResident
	LastUsed time.Time
	InFlight int
	AlwaysOn bool
	Pinned   bool // pinned by an operator
	Busy     bool // loading or unloading: its memory counts, but it cannot be evicted now
}

// Snapshot is everything placement decides from: a copy, so that Place
// does no I/O, reads no clock and can be table-tested.
type Snapshot struct {
	GPUs      []GPUState
	Residents []Resident
	// MaxModels caps how many models are resident at once; 0 is no cap.
	MaxModels int
	// MinResident protects a model placed less than this long ago: it is
	// evicted only when nothing else makes room.
	MinResident time.Duration
	Now         time.Time
}

// Demand is a model to place: what it needs of the GPUs.
type Demand struct {
	Model  string
	PerGPU uint64 // memory it needs on each of its GPUs
	TP     int    // how many GPUs it spans (tensor parallel); 0 means 1
	// Allowed pins the model to exactly these GPUs; nil lets it go anywhere.
	Allowed []int
}

// Plan says where a model goes and what must be unloaded first.
type Plan struct {
	GPUs  []int
	Evict []string
}

// SimilarGPUs is how far apart in size the GPUs of one tensor-parallel
// model may be: vLLM splits a model evenly, so the smallest GPU bounds it.
const SimilarGPUs = 1.05

// Place decides where w goes: on the GPU (or, tensor parallel, the set of
// similar GPUs) where it fits with the most free memory; failing that, on
// the one that needs the fewest evictions of idle models, least recently
// used first. Models that are always on, pinned, busy or serving requests
// are never evicted; models placed less than MinResident ago only when
// nothing else makes room. MaxModels counts too. Place is pure: it does no
// I/O and no logging, and the same state always gives the same plan.
func Place(s Snapshot, w Demand) (Plan, error) {
	tp := max(w.TP, 1)
	sets := candidateSets(s.GPUs, tp, w.Allowed)
	free := freeMemory(s)
	var best *option
	for _, young := range []bool{false, true} {
		for _, set := range sets {
			if o, ok := tryEvictions(s, free, w, set, young); ok && o.better(best) {
				best = &o
			}
		}
		if best != nil {
			return Plan{GPUs: best.gpus, Evict: best.evict}, nil
		}
	}
	return Plan{}, noRoom(s, free, w, tp, len(sets) == 0)
}

// option is one feasible placement.
type option struct {
	gpus    []int
	evict   []string
	minFree int64 // the least free memory on its GPUs after placing
}

// better prefers fewer evictions, then more room left, then lower GPUs.
func (o option) better(than *option) bool {
	if than == nil {
		return true
	}
	if len(o.evict) != len(than.evict) {
		return len(o.evict) < len(than.evict)
	}
	if o.minFree != than.minFree {
		return o.minFree > than.minFree
	}
	return slices.Compare(o.gpus, than.gpus) < 0
}

// freeMemory is each GPU's memory not used by others or reserved by a
// resident model, by GPU index. It goes negative when a GPU is over
// committed.
func freeMemory(s Snapshot) map[int]int64 {
	free := make(map[int]int64, len(s.GPUs))
	for _, g := range s.GPUs {
		free[g.Index] = int64(g.Total) - int64(g.External)
	}
	for _, r := range s.Residents {
		for _, g := range r.GPUs {
			free[g] -= int64(r.PerGPU)
		}
	}
	return free
}

// candidateSets lists the GPU sets a model of tp GPUs may take: the pinned
// set, each GPU, or each combination of tp GPUs of similar size.
func candidateSets(gpus []GPUState, tp int, allowed []int) [][]int {
	if len(allowed) > 0 {
		set := slices.Clone(allowed)
		slices.Sort(set)
		for _, g := range set {
			if !slices.ContainsFunc(gpus, func(s GPUState) bool { return s.Index == g }) {
				return nil
			}
		}
		return [][]int{set}
	}
	sorted := slices.Clone(gpus)
	slices.SortFunc(sorted, func(a, b GPUState) int { return cmp.Compare(a.Index, b.Index) })
	var sets [][]int
	var pick func(start int, chosen []GPUState)
	pick = func(start int, chosen []GPUState) {
		if len(chosen) == tp {
			set := make([]int, tp)
			for i, g := range chosen {
				set[i] = g.Index
			}
			sets = append(sets, set)
			return
		}
		for i := start; i < len(sorted); i++ {
			if !similarToAll(chosen, sorted[i].Total) {
				continue
			}
			pick(i+1, append(chosen, sorted[i]))
		}
	}
	pick(0, nil)
	return sets
}

// similarToAll reports whether a GPU of size total keeps the set within
// SimilarGPUs of its smallest.
func similarToAll(set []GPUState, total uint64) bool {
	lo, hi := total, total
	for _, g := range set {
		lo, hi = min(lo, g.Total), max(hi, g.Total)
	}
	return float64(hi) <= float64(lo)*SimilarGPUs
}

// evictable says whether r may be evicted, and if not, why.
func evictable(s Snapshot, r Resident, young bool) (bool, string) {
	switch {
	case r.AlwaysOn:
		return false, "always_on"
	case r.Pinned:
		return false, "pinned"
	case r.Busy:
		return false, "loading or unloading"
	case r.InFlight > 0:
		return false, fmt.Sprintf("%d in flight", r.InFlight)
	case !young && s.Now.Sub(r.Since) < s.MinResident:
		return false, "younger than min_resident"
	}
	return true, "idle"
}

// tryEvictions finds, for one GPU set, the least recently used evictable
// models whose unloading makes room (and keeps MaxModels), then keeps any
// of them that turned out not to be needed, most recently used first.
func tryEvictions(s Snapshot, free map[int]int64, w Demand, set []int, young bool) (option, bool) {
	var lru []Resident
	for _, r := range s.Residents {
		if ok, _ := evictable(s, r, young); ok {
			lru = append(lru, r)
		}
	}
	slices.SortStableFunc(lru, func(a, b Resident) int {
		return cmp.Or(a.LastUsed.Compare(b.LastUsed), cmp.Compare(a.Model, b.Model))
	})
	need := int64(w.PerGPU)
	fits := func(chosen []Resident) bool {
		for _, g := range set {
			f := free[g]
			for _, r := range chosen {
				if slices.Contains(r.GPUs, g) {
					f += int64(r.PerGPU)
				}
			}
			if f < need {
				return false
			}
		}
		return s.MaxModels == 0 || len(s.Residents)-len(chosen) < s.MaxModels
	}
	var chosen []Resident
	for _, r := range lru {
		if fits(chosen) {
			break
		}
		// Unloading r helps only if it frees one of the set's GPUs, or a
		// place under MaxModels.
		onSet := slices.ContainsFunc(r.GPUs, func(g int) bool { return slices.Contains(set, g) })
		overCap := s.MaxModels > 0 && len(s.Residents)-len(chosen) >= s.MaxModels
		if onSet || overCap {
			chosen = append(chosen, r)
		}
	}
	if !fits(chosen) {
		return option{}, false
	}
	// Keep back what was not needed, the most recently used first.
	for i := len(chosen) - 1; i >= 0; i-- {
		without := slices.Delete(slices.Clone(chosen), i, i+1)
		if fits(without) {
			chosen = without
		}
	}
	o := option{gpus: set, minFree: 1<<63 - 1}
	for _, r := range chosen {
		o.evict = append(o.evict, r.Model)
	}
	for _, g := range set {
		f := free[g] - need
		for _, r := range chosen {
			if slices.Contains(r.GPUs, g) {
				f += int64(r.PerGPU)
			}
		}
		o.minFree = min(o.minFree, f)
	}
	return o, true
}

// NoRoom is the answer when a model cannot be placed now. It names, per
// GPU, what the model needs, what is free and who holds the rest, so that
// the operator (and the 503 the client gets) can see why.
type NoRoom struct {
	Model     string
	Need      uint64
	TP        int
	MaxModels int // set when the cap on resident models is what binds
	Reason    string
	GPUs      []GPUReport
}

// GPUReport is one GPU in a NoRoom diagnostic.
type GPUReport struct {
	Index    int
	Total    uint64
	Free     int64
	External uint64
	Holders  []Holder
}

// Holder is a model holding memory on a GPU, and why it stays.
type Holder struct {
	Model string
	Bytes uint64
	Why   string
}

func noRoom(s Snapshot, free map[int]int64, w Demand, tp int, noSet bool) *NoRoom {
	e := &NoRoom{Model: w.Model, Need: w.PerGPU, TP: tp}
	switch {
	case noSet && len(w.Allowed) > 0:
		e.Reason = fmt.Sprintf("its pinned GPUs %v do not all exist", w.Allowed)
	case noSet:
		e.Reason = fmt.Sprintf("there are no %d GPUs of similar size", tp)
	case s.MaxModels > 0 && len(s.Residents) >= s.MaxModels:
		e.MaxModels = s.MaxModels
		e.Reason = fmt.Sprintf("max_models %d are resident and none can be unloaded now", s.MaxModels)
	default:
		e.Reason = "no GPU has room and not enough can be unloaded now"
	}
	for _, g := range s.GPUs {
		r := GPUReport{Index: g.Index, Total: g.Total, Free: free[g.Index], External: g.External}
		for _, m := range s.Residents {
			if slices.Contains(m.GPUs, g.Index) {
				_, why := evictable(s, m, false)
				r.Holders = append(r.Holders, Holder{Model: m.Model, Bytes: m.PerGPU, Why: why})
			}
		}
		e.GPUs = append(e.GPUs, r)
	}
	return e
}

func (e *NoRoom) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "cannot place %s (needs %s", e.Model, gib(int64(e.Need)))
	if e.TP > 1 {
		fmt.Fprintf(&b, " on each of %d GPUs", e.TP)
	}
	fmt.Fprintf(&b, "): %s", e.Reason)
	for _, g := range e.GPUs {
		fmt.Fprintf(&b, "; gpu%d: %s free of %s", g.Index, gib(g.Free), gib(int64(g.Total)))
		var held []string
		for _, h := range g.Holders {
			held = append(held, fmt.Sprintf("%s %s (%s)", h.Model, gib(int64(h.Bytes)), h.Why))
		}
		if g.External > 0 {
			held = append(held, "other processes "+gib(int64(g.External)))
		}
		if len(held) > 0 {
			b.WriteString(", held by " + strings.Join(held, ", "))
		}
	}
	return b.String()
}

// gib renders bytes in GiB with one decimal.
func gib(n int64) string { return fmt.Sprintf("%.1fGiB", float64(n)/(1<<30)) }
