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

// Resident is a model that holds GPU memory: loaded, loading, being
// unloaded, or asleep.
type Resident struct {
	Model    string
	GPUs     []int
	PerGPU   uint64    // what it holds on each of its GPUs: its footprint, or asleep its residual
	Since    time.Time // when it was placed; see Snapshot.MinResident
	LastUsed time.Time
	InFlight int
	AlwaysOn bool
	Pinned   bool // pinned by an operator
	Busy     bool // loading, waking, falling asleep or unloading: its memory counts, but it cannot be evicted now

	// Asleep says its server sleeps: it holds only its residual (PerGPU)
	// of the GPUs, and Host of host memory. An eviction stops it.
	Asleep bool
	// Leaving says it is being stopped: what it holds is on its way back,
	// and counts as held until it is (see OverHost).
	Leaving bool
	// Host is the host memory it holds asleep, or will once asleep.
	Host uint64
	// CanSleep says an eviction may put it to sleep rather than stop it:
	// it is awake and its server is in sleep mode. Asleep, it keeps
	// Residual of each of its GPUs and SleepHost of host memory.
	CanSleep  bool
	Residual  uint64
	SleepHost uint64
}

// Snapshot is everything placement decides from: a copy, so that Place
// does no I/O, reads no clock and can be table-tested.
type Snapshot struct {
	GPUs      []GPUState
	Residents []Resident
	// MaxModels caps how many models are awake at once (sleepers are not
	// counted); 0 is no cap.
	MaxModels int
	// MinResident protects a model placed less than this long ago: it is
	// evicted only when nothing else makes room.
	MinResident time.Duration
	// HostBudget is the host memory sleeping models may hold in all.
	HostBudget uint64
	Now        time.Time
}

// awake counts the residents that are not asleep: those MaxModels caps.
func (s Snapshot) awake() int {
	n := 0
	for _, r := range s.Residents {
		if !r.Asleep {
			n++
		}
	}
	return n
}

// hostUsed is the host memory the sleeping residents hold, or will.
func (s Snapshot) hostUsed() uint64 {
	var n uint64
	for _, r := range s.Residents {
		n += r.Host
	}
	return n
}

// Demand is a model to place: what it needs of the GPUs.
type Demand struct {
	Model  string
	PerGPU uint64 // memory it needs on each of its GPUs
	TP     int    // how many GPUs it spans (tensor parallel); 0 means 1
	// Allowed pins the model to exactly these GPUs; nil lets it go anywhere.
	Allowed []int
}

// Plan says where a model goes and what must leave the GPUs first: the
// models to stop (Evict), and those to put to sleep (Sleep).
type Plan struct {
	GPUs  []int
	Evict []string
	Sleep []string
}

// SimilarGPUs is how far apart in size the GPUs of one tensor-parallel
// model may be: vLLM splits a model evenly, so the smallest GPU bounds it.
const SimilarGPUs = 1.05

// Place decides where w goes: on the GPU (or, tensor parallel, the set of
// similar GPUs) where it fits with the most free memory; failing that, on
// the one that needs the fewest idle models put down, least recently used
// first. Awake and sleeping models form one LRU: an awake model put down
// sleeps when it can (its server is in sleep mode and host memory has
// room, made if need be by stopping sleepers used less recently than it),
// else it stops; a sleeper put down stops, giving back its residual and
// its host memory. Models that are always on, pinned, busy or serving
// requests are never put down; models placed less than MinResident ago
// only when nothing else makes room. MaxModels caps the awake models.
//
// A sleeping model's wake is placed as its own Demand: it stays on its
// GPUs and needs there its footprint less the residual it holds. Its host
// memory is given back only once it is awake, after those it puts down
// sleep, so a wake's plan counts both.
//
// Place is pure: it does no I/O and no logging, and the same state always
// gives the same plan.
func Place(s Snapshot, w Demand) (Plan, error) {
	tp := max(w.TP, 1)
	if r, ok := s.resident(w.Model); ok && r.Asleep {
		w.Allowed = r.GPUs // a wake: where it sleeps
	}
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
			return Plan{GPUs: best.gpus, Evict: best.evict, Sleep: best.sleep}, nil
		}
	}
	return Plan{}, noRoom(s, free, w, tp, len(sets) == 0)
}

// resident finds the resident called model.
func (s Snapshot) resident(model string) (Resident, bool) {
	i := slices.IndexFunc(s.Residents, func(r Resident) bool { return r.Model == model })
	if i < 0 {
		return Resident{}, false
	}
	return s.Residents[i], true
}

// option is one feasible placement.
type option struct {
	gpus    []int
	evict   []string // stopped
	sleep   []string // put to sleep
	awake   int      // awake models put down (stopped or put to sleep)
	minFree int64    // the least free memory on its GPUs after placing
}

// better prefers fewer awake models put down, then fewer stopped, then
// more room left, then lower GPUs.
func (o option) better(than *option) bool {
	switch {
	case than == nil:
		return true
	case o.awake != than.awake:
		return o.awake < than.awake
	case len(o.evict) != len(than.evict):
		return len(o.evict) < len(than.evict)
	case o.minFree != than.minFree:
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
		return false, "loading, waking or unloading"
	case r.InFlight > 0:
		return false, fmt.Sprintf("%d in flight", r.InFlight)
	case !young && s.Now.Sub(r.Since) < s.MinResident:
		return false, "younger than min_resident"
	case r.Asleep:
		return true, "asleep"
	}
	return true, "idle"
}

// putDown is one model leaving the GPUs for a placement: stopped, or put
// to sleep.
type putDown struct {
	r     Resident
	sleep bool
}

// gives is what d gives back of GPU g.
func (d putDown) gives(g int) int64 {
	if !slices.Contains(d.r.GPUs, g) {
		return 0
	}
	if d.sleep {
		return int64(d.r.PerGPU) - int64(d.r.Residual)
	}
	return int64(d.r.PerGPU)
}

// hostAfter is the host memory in use once steps are done.
func hostAfter(used uint64, steps []putDown) int64 {
	n := int64(used)
	for _, d := range steps {
		switch {
		case d.sleep:
			n += int64(d.r.SleepHost)
		case d.r.Asleep:
			n -= int64(d.r.Host)
		}
	}
	return n
}

// tryEvictions finds, for one GPU set, the least recently used models to
// put down (see Place) that make room for w and keep MaxModels and the
// host memory budget, then keeps any of them that turned out not to be
// needed, most recently used first.
func tryEvictions(s Snapshot, free map[int]int64, w Demand, set []int, young bool) (option, bool) {
	lru := lruOf(s, young, w.Model)
	need := int64(w.PerGPU)
	awake := s.awake()
	host := s.hostUsed()
	if r, ok := s.resident(w.Model); ok && r.Asleep {
		// A wake: it holds its residual already, and becomes one more
		// awake model. Its host memory it holds until it is awake, after
		// those it puts down have fallen asleep: both count.
		need -= int64(r.PerGPU)
	}
	fits := func(steps []putDown) bool {
		for _, g := range set {
			f := free[g]
			for _, d := range steps {
				f += d.gives(g)
			}
			if f < need {
				return false
			}
		}
		// A plan may not take the host memory past its budget, nor, where
		// it is past it already (the budget lowered, a sleeper measured
		// larger than foreseen), further past.
		if h := hostAfter(host, steps); h > int64(s.HostBudget) && h > int64(host) {
			return false
		}
		return s.MaxModels == 0 || awake-awakeIn(steps) < s.MaxModels
	}
	var steps []putDown
	for i, r := range lru {
		if fits(steps) {
			break
		}
		if slices.ContainsFunc(steps, func(d putDown) bool { return d.r.Model == r.Model }) {
			continue // stopped already, to make host memory for a sleeper
		}
		// Putting r down helps only if it frees one of the set's GPUs,
		// or, awake, a place under MaxModels.
		onSet := slices.ContainsFunc(r.GPUs, func(g int) bool { return slices.Contains(set, g) })
		overCap := !r.Asleep && s.MaxModels > 0 && awake-awakeIn(steps) >= s.MaxModels
		if !onSet && !overCap {
			continue
		}
		if r.CanSleep {
			if room, ok := hostRoom(s.HostBudget, hostAfter(host, steps), r.SleepHost, lru[:i], steps); ok {
				steps = append(append(steps, room...), putDown{r: r, sleep: true})
				continue
			}
		}
		steps = append(steps, putDown{r: r})
	}
	// Sleepers keep their residual: where that leaves too little, stop
	// them instead, least recently used first.
	for i := range steps {
		if fits(steps) {
			break
		}
		steps[i].sleep = false
	}
	if !fits(steps) {
		return option{}, false
	}
	// Keep back what was not needed, the most recently used first, until
	// nothing more can be: keeping one awake may free the host memory
	// that made another's stop needed.
	for kept := true; kept; {
		kept = false
		for i := len(steps) - 1; i >= 0; i-- {
			if without := slices.Delete(slices.Clone(steps), i, i+1); fits(without) {
				steps, kept = without, true
			}
		}
	}
	o := option{gpus: set, minFree: 1<<63 - 1, awake: awakeIn(steps)}
	for _, d := range steps {
		if d.sleep {
			o.sleep = append(o.sleep, d.r.Model)
		} else {
			o.evict = append(o.evict, d.r.Model)
		}
	}
	for _, g := range set {
		f := free[g] - need
		for _, d := range steps {
			f += d.gives(g)
		}
		o.minFree = min(o.minFree, f)
	}
	return o, true
}

// lruOf lists the residents that may be put down, least recently used
// first; but never the model being placed (which, asleep, is woken).
func lruOf(s Snapshot, young bool, placing string) []Resident {
	var lru []Resident
	for _, r := range s.Residents {
		if ok, _ := evictable(s, r, young); ok && r.Model != placing {
			lru = append(lru, r)
		}
	}
	slices.SortStableFunc(lru, func(a, b Resident) int {
		return cmp.Or(a.LastUsed.Compare(b.LastUsed), cmp.Compare(a.Model, b.Model))
	})
	return lru
}

// awakeIn counts the awake models among steps.
func awakeIn(steps []putDown) int {
	n := 0
	for _, d := range steps {
		if !d.r.Asleep {
			n++
		}
	}
	return n
}

// hostRoom finds the sleepers to stop, least recently used first among
// older (those used less recently than the model to sleep, and not yet
// among steps), so that need more bytes of host memory fit the budget
// with used in use. It reports false when they are not enough: the model
// is then stopped rather than a more recently used sleeper.
func hostRoom(budget uint64, used int64, need uint64, older []Resident, steps []putDown) ([]putDown, bool) {
	var stop []putDown
	for _, r := range older {
		if used+int64(need) <= int64(budget) {
			break
		}
		if !r.Asleep || r.Host == 0 || slices.ContainsFunc(steps, func(d putDown) bool { return d.r.Model == r.Model }) {
			continue
		}
		stop = append(stop, putDown{r: r})
		used -= int64(r.Host)
	}
	return stop, used+int64(need) <= int64(budget)
}

// SleepOrStop decides how an idle model leaves its GPUs when nothing
// needs its room (its inactivity timeout passed, or an operator asked it
// to sleep): asleep if it can sleep and host memory has room, made if
// need be by stopping sleepers used less recently than it, which it
// returns; else stopped (false). Like Place it is pure.
func SleepOrStop(s Snapshot, model string) (stop []string, sleep bool) {
	r, ok := s.resident(model)
	if !ok || !r.CanSleep {
		return nil, false
	}
	var older []Resident
	for _, o := range lruOf(s, true, model) {
		if o.LastUsed.Compare(r.LastUsed) < 0 || (o.LastUsed.Equal(r.LastUsed) && o.Model < r.Model) {
			older = append(older, o)
		}
	}
	room, ok := hostRoom(s.HostBudget, int64(s.hostUsed()), r.SleepHost, older, nil)
	if !ok {
		return nil, false
	}
	for _, d := range room {
		stop = append(stop, d.r.Model)
	}
	return stop, true
}

// OverHost lists the sleepers to stop, least recently used first, to
// bring the host memory sleepers hold back within the budget: after the
// budget was lowered, or a sleeper was measured larger than foreseen.
// What those already leaving hold counts as given back: else, while one
// is being stopped to make room for another's sleep, the two together
// would seem past the budget, and a third be stopped for nothing.
func OverHost(s Snapshot) []string {
	used := int64(s.hostUsed())
	for _, r := range s.Residents {
		if r.Leaving {
			used -= int64(r.Host)
		}
	}
	var stop []string
	for _, r := range lruOf(s, true, "") {
		if used <= int64(s.HostBudget) {
			break
		}
		if r.Asleep && r.Host > 0 {
			stop = append(stop, r.Model)
			used -= int64(r.Host)
		}
	}
	return stop
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
	case s.MaxModels > 0 && s.awake() >= s.MaxModels:
		e.MaxModels = s.MaxModels
		e.Reason = fmt.Sprintf("max_models %d are awake and none can be put down now", s.MaxModels)
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
