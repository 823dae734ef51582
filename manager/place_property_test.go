package manager

import (
	"fmt"
	"math/rand"
	"slices"
	"strings"
	"testing"
	"time"
)

// randSnapshot builds a random, self-consistent snapshot as the scheduler
// would: awake idle models (some in sleep mode), sleepers, busy, in
// flight, pinned, always-on and young models.
func randSnapshot(rng *rand.Rand) Snapshot {
	s := Snapshot{Now: t0, MinResident: 10 * time.Minute}
	ng := 1 + rng.Intn(3)
	for i := 0; i < ng; i++ {
		total := []uint64{40, 80, 80, 82, 100}[rng.Intn(5)]
		s.GPUs = append(s.GPUs, GPUState{Index: i, Total: total * gb, External: uint64(rng.Intn(3)) * gb})
	}
	s.HostBudget = uint64(rng.Intn(8)*10) * gb
	if rng.Intn(3) == 0 {
		s.MaxModels = 1 + rng.Intn(3)
	}
	nr := rng.Intn(7)
	for i := 0; i < nr; i++ {
		r := Resident{Model: fmt.Sprintf("r%d", i), Since: ago(time.Hour), LastUsed: ago(time.Duration(rng.Intn(5)) * time.Minute)}
		tp := 1
		if ng > 1 && rng.Intn(4) == 0 {
			tp = 2
		}
		perm := rng.Perm(ng)[:tp]
		slices.Sort(perm)
		r.GPUs = perm
		r.PerGPU = uint64(5+rng.Intn(50)) * gb
		switch rng.Intn(10) {
		case 0, 1, 2: // asleep
			r.Asleep = true
			r.PerGPU = uint64(1+rng.Intn(3)) * gb
			r.Host = uint64(rng.Intn(5)*10) * gb
		case 3:
			r.Busy = true
		case 4:
			r.InFlight = 1 + rng.Intn(2)
		case 5:
			r.Pinned = true
		case 6:
			r.AlwaysOn = true
		case 7:
			r.Since = ago(time.Minute) // young
		}
		if !r.Asleep && !r.Busy && rng.Intn(2) == 0 {
			r.CanSleep = true
			r.Residual = uint64(1+rng.Intn(3)) * gb
			r.SleepHost = uint64(rng.Intn(5)*10) * gb
		}
		s.Residents = append(s.Residents, r)
	}
	return s
}

func randDemand(rng *rand.Rand, s Snapshot) Demand {
	var sleepers []Resident
	for _, r := range s.Residents {
		if r.Asleep && !r.Busy {
			sleepers = append(sleepers, r)
		}
	}
	if len(sleepers) > 0 && rng.Intn(2) == 0 {
		r := sleepers[rng.Intn(len(sleepers))]
		return Demand{Model: r.Model, PerGPU: r.PerGPU + uint64(rng.Intn(60))*gb, TP: len(r.GPUs)}
	}
	d := Demand{Model: "new", PerGPU: uint64(1+rng.Intn(80)) * gb, TP: 1}
	if len(s.GPUs) > 1 && rng.Intn(4) == 0 {
		d.TP = 2
	}
	return d
}

// older says a is before b in placement's LRU.
func older(a, b Resident) bool {
	return a.LastUsed.Before(b.LastUsed) || (a.LastUsed.Equal(b.LastUsed) && a.Model < b.Model)
}

// checkPlan checks a plan against Place's documented rules, independently
// of its code.
func checkPlan(s Snapshot, w Demand, p Plan) error {
	res := map[string]Resident{}
	for _, r := range s.Residents {
		res[r.Model] = r
	}
	placing, wake := res[w.Model]
	wake = wake && placing.Asleep
	for _, n := range append(slices.Clone(p.Evict), p.Sleep...) {
		r, ok := res[n]
		if !ok {
			return fmt.Errorf("%s put down is no resident", n)
		}
		if n == w.Model {
			return fmt.Errorf("%s puts itself down", n)
		}
		if r.AlwaysOn || r.Pinned || r.Busy || r.InFlight > 0 {
			return fmt.Errorf("protected %s put down: %+v", n, r)
		}
	}
	for _, n := range p.Sleep {
		if r := res[n]; !r.CanSleep || r.Asleep {
			return fmt.Errorf("%s put to sleep though it cannot: %+v", n, r)
		}
	}
	// GPU memory after the plan.
	for _, g := range p.GPUs {
		var st GPUState
		for _, x := range s.GPUs {
			if x.Index == g {
				st = x
			}
		}
		held := int64(st.External)
		for _, r := range s.Residents {
			if !slices.Contains(r.GPUs, g) || r.Model == w.Model {
				continue
			}
			switch {
			case slices.Contains(p.Evict, r.Model):
			case slices.Contains(p.Sleep, r.Model):
				held += int64(r.Residual)
			default:
				held += int64(r.PerGPU)
			}
		}
		held += int64(w.PerGPU)
		if held > int64(st.Total) {
			return fmt.Errorf("gpu%d overcommitted: %d GiB held of %d", g, held/gb, st.Total/gb)
		}
	}
	if wake && !slices.Equal(p.GPUs, placing.GPUs) {
		return fmt.Errorf("a wake moved from %v to %v", placing.GPUs, p.GPUs)
	}
	// Host memory after the plan (a wake's own host still held).
	var before, after int64
	for _, r := range s.Residents {
		before += int64(r.Host)
		if !slices.Contains(p.Evict, r.Model) {
			after += int64(r.Host)
		}
		if slices.Contains(p.Sleep, r.Model) {
			after += int64(r.SleepHost)
		}
	}
	if after > int64(s.HostBudget) && after > before {
		return fmt.Errorf("host memory %d GiB after, budget %d, before %d", after/gb, s.HostBudget/gb, before/gb)
	}
	// max_models: the awake after the plan, the placed one included.
	if s.MaxModels > 0 {
		awake := 1
		for _, r := range s.Residents {
			if !r.Asleep && r.Model != w.Model && !slices.Contains(p.Evict, r.Model) && !slices.Contains(p.Sleep, r.Model) {
				awake++
			}
		}
		if awake > s.MaxModels {
			return fmt.Errorf("%d awake after, max_models %d", awake, s.MaxModels)
		}
	}
	// A sleeper stopped off the plan's GPUs is stopped only for host
	// room, and only for a model put to sleep used less recently than it.
	for _, n := range p.Evict {
		r := res[n]
		onSet := slices.ContainsFunc(r.GPUs, func(g int) bool { return slices.Contains(p.GPUs, g) })
		if !r.Asleep || onSet {
			continue
		}
		ok := false
		for _, m := range p.Sleep {
			if older(r, res[m]) {
				ok = true
			}
		}
		if !ok {
			return fmt.Errorf("sleeper %s (off the plan's GPUs) stopped but no model put to sleep is more recent: sleep %v", n, p.Sleep)
		}
	}
	return nil
}

func resOf(s Snapshot, n string) Resident { r, _ := s.resident(n); return r }

// TestPlaceProperties: over random snapshots, every plan keeps the rules
// Place documents (see checkPlan), and is the same whatever the order of
// the residents.
func TestPlaceProperties(t *testing.T) {
	seen := map[string]int{}
	for seed := int64(0); seed < 30000; seed++ {
		rng := rand.New(rand.NewSource(seed))
		s := randSnapshot(rng)
		w := randDemand(rng, s)
		p, err := Place(s, w)
		// Determinism: the residents in another order give the same plan.
		s2 := s
		s2.Residents = slices.Clone(s.Residents)
		rng.Shuffle(len(s2.Residents), func(i, j int) { s2.Residents[i], s2.Residents[j] = s2.Residents[j], s2.Residents[i] })
		p2, err2 := Place(s2, w)
		if (err == nil) != (err2 == nil) || !slices.Equal(p.GPUs, p2.GPUs) || !slices.Equal(p.Evict, p2.Evict) || !slices.Equal(p.Sleep, p2.Sleep) {
			t.Errorf("seed %d: order changes the plan: %+v %v vs %+v %v", seed, p, err, p2, err2)
		}
		if err != nil {
			continue
		}
		e := checkPlan(s, w, p)
		if e == nil {
			// Minimal: each put-down is needed.
			for _, n := range append(slices.Clone(p.Evict), p.Sleep...) {
				q := Plan{GPUs: p.GPUs, Evict: slices.DeleteFunc(slices.Clone(p.Evict), func(x string) bool { return x == n }),
					Sleep: slices.DeleteFunc(slices.Clone(p.Sleep), func(x string) bool { return x == n })}
				qe := checkPlan(s, w, q)
				if qe == nil {
					e = fmt.Errorf("not minimal: %s is not needed", n)
					break
				}
				// A sleeper kept only for host room must be older than a model put to sleep.
				if r := resOf(s, n); r.Asleep && strings.HasPrefix(qe.Error(), "host memory") {
					ok := false
					for _, m := range p.Sleep {
						if older(r, resOf(s, m)) {
							ok = true
						}
					}
					if !ok {
						e = fmt.Errorf("sleeper %s stopped for host room, for no older model put to sleep: sleep %v", n, p.Sleep)
					}
				}
			}
		}
		if e != nil {
			key := e.Error()[:min(20, len(e.Error()))]
			seen[key]++
			if seen[key] <= 2 {
				t.Errorf("seed %d: %v\n  demand %+v\n  plan %+v\n  snapshot budget %d max %d gpus %+v", seed, e, w, p, s.HostBudget/gb, s.MaxModels, s.GPUs)
				for _, r := range s.Residents {
					t.Logf("    %+v", r)
				}
			}
		}
	}
	t.Logf("violations by kind: %v", seen)
}

// TestSleepOrStopOverHostProperties: over random snapshots, SleepOrStop
// and OverHost stop only older, unprotected sleepers, and what is left
// fits the budget.
func TestSleepOrStopOverHostProperties(t *testing.T) {
	for seed := int64(0); seed < 20000; seed++ {
		rng := rand.New(rand.NewSource(seed))
		s := randSnapshot(rng)
		var used int64
		for _, r := range s.Residents {
			used += int64(r.Host)
		}
		for _, r := range s.Residents {
			stop, ok := SleepOrStop(s, r.Model)
			if !ok {
				if len(stop) > 0 {
					t.Fatalf("seed %d: no sleep but stops %v", seed, stop)
				}
				continue
			}
			if !r.CanSleep {
				t.Fatalf("seed %d: %s sleeps though it cannot", seed, r.Model)
			}
			after := used + int64(r.SleepHost)
			for _, n := range stop {
				o := resOf(s, n)
				if !o.Asleep || o.Busy || o.Pinned || o.AlwaysOn || o.InFlight > 0 || !older(o, r) {
					t.Fatalf("seed %d: %s's sleep stops %+v", seed, r.Model, o)
				}
				after -= int64(o.Host)
			}
			if after > int64(s.HostBudget) {
				t.Fatalf("seed %d: %s's sleep takes host memory to %d of %d", seed, r.Model, after/gb, s.HostBudget/gb)
			}
		}
		stop := OverHost(s)
		after := used
		for _, n := range stop {
			o := resOf(s, n)
			if !o.Asleep || o.Busy || o.Pinned || o.AlwaysOn || o.InFlight > 0 {
				t.Fatalf("seed %d: OverHost stops %+v", seed, o)
			}
			after -= int64(o.Host)
		}
		if len(stop) > 0 && used <= int64(s.HostBudget) {
			t.Fatalf("seed %d: OverHost stops %v within budget", seed, stop)
		}
	}
}

// TestPlaceKeepsBackAllNotNeeded: keeping a model awake gives back host
// memory, which can make a sleeper's stop unneeded after it was looked
// at: it is kept back too.
func TestPlaceKeepsBackAllNotNeeded(t *testing.T) {
	s := Snapshot{Now: t0, GPUs: gpus(80), HostBudget: 60 * gb, Residents: []Resident{
		asleep("m", 0, 4*time.Minute, 0),
		with(asleep("s", 0, 2*time.Minute, 30), func(r *Resident) { r.PerGPU = 3 * gb }),
		sleepy("big", 0, 48, time.Minute, 20),
		sleepy("small", 0, 8, 5*time.Minute, 20),
	}}
	s.Residents[0].PerGPU = 1 * gb
	plan, err := Place(s, Demand{Model: "m", PerGPU: 45 * gb})
	if err != nil {
		t.Fatal(err)
	}
	// big asleep alone makes room: 80-3-2-8 = 67 >= 45 of GPU, 30+20 = 50 <= 60 of host.
	if len(plan.Evict) > 0 {
		t.Errorf("Place = %+v: sleeper s stopped though putting big to sleep alone fits", plan)
	}
}
