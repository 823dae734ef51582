package extproc

import (
	"runtime"
	"sync/atomic"
	"time"
)

// Outcome is what admission did with a request.
type Outcome uint8

const (
	OutcomeAdmitted  Outcome = iota + 1 // sent on to the model
	OutcomeQueued                       // waiting for a slot or for the model to load
	OutcomeRejected                     // answered with an error by vgw
	OutcomeTimedOut                     // waited past its deadline: 504
	OutcomeAbandoned                    // the client went away while it waited
)

var outcomeNames = [...]string{"", "admitted", "queued", "rejected", "timed_out", "abandoned"}

func (o Outcome) String() string {
	if int(o) < len(outcomeNames) {
		return outcomeNames[o]
	}
	return "unknown"
}

// ParseOutcome is the inverse of Outcome.String.
func ParseOutcome(s string) (Outcome, bool) {
	for i, n := range outcomeNames {
		if i > 0 && n == s {
			return Outcome(i), true
		}
	}
	return 0, false
}

// Reason says why a request got its outcome.
type Reason uint8

const (
	ReasonNone         Reason = iota
	ReasonSlotFree            // a slot was free at once
	ReasonSlotGranted         // a slot was handed over after waiting
	ReasonQueueFull           // 429
	ReasonQueueTimeout        // 504 waiting for a slot
	ReasonLoadTimeout         // 504 waiting for the model to load
	ReasonLoadFailed          // 503 the model could not be placed or loaded
	ReasonUnknownModel        // 404
	ReasonBadRequest          // 400 bad JSON or no model
	ReasonTooLarge            // 413
	ReasonWaitSlot            // queued behind other requests
	ReasonWaitLoad            // waiting for the model to load
	ReasonClientGone          // the client left
	ReasonDraining            // 503 the gateway is draining
	ReasonModelReady          // sent on once its model had loaded
	ReasonNotRoutable         // 503 the request's Envoy cannot route to the ready model
	ReasonWaitWake            // waiting for the sleeping model to wake
	ReasonModelWoken          // sent on once its model had woken
	ReasonTenantFull          // 429 its tenant has as many waiting as it may
	ReasonDisplaced           // 429 taken out of the full queue for a request of a higher priority, or of a tenant further under its share
	ReasonOverBudget          // 429 its tenant has spent its requests or tokens per minute
)

var reasonNames = [...]string{"", "slot_free", "slot_granted", "queue_full", "queue_timeout", "load_timeout",
	"load_failed", "unknown_model", "bad_request", "too_large", "wait_slot", "wait_load", "client_gone", "draining", "model_ready", "not_routable",
	"wait_wake", "model_woken", "tenant_queue_full", "displaced", "over_budget"}

func (r Reason) String() string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return "unknown"
}

// A Decision is one admission decision, rendered from the ring on demand.
type Decision struct {
	Time       time.Time
	Model      string
	Outcome    Outcome
	Reason     Reason
	Status     int // HTTP status vgw answered with; 0 when it answered none
	QueueDepth int
	Wait       time.Duration
	// Tenant is the request's flow's tenant: a configured tenant's name,
	// or DefaultTenant; "" for a request decided before its headers were
	// read. Priority is its priority.
	Tenant   string
	Priority int
}

// DecisionLog is a bounded ring of the most recent decisions. Writers never
// allocate and never take a lock: each takes a position with one atomic
// add, claims its slot with a compare-and-swap on the slot's sequence
// number, and fills it with atomic stores, so a reader sees a slot whole or
// skips it. Nothing is formatted until Recent is called.
type DecisionLog struct {
	next  atomic.Uint64
	mask  uint64
	slots []decisionSlot
}

type decisionSlot struct {
	seq      atomic.Uint64 // 2*pos+1 while slot pos is written, 2*pos+2 once whole
	at       atomic.Int64  // unix nanoseconds
	wait     atomic.Int64
	packed   atomic.Uint64 // outcome<<56 | reason<<48 | status<<32 | depth
	model    atomic.Pointer[string]
	tenant   atomic.Pointer[string]
	priority atomic.Int64
}

// NewDecisionLog returns a ring that keeps the last size decisions, size
// rounded up to a power of two (at least 2).
func NewDecisionLog(size int) *DecisionLog {
	n := 2
	for n < size {
		n <<= 1
	}
	return &DecisionLog{mask: uint64(n - 1), slots: make([]decisionSlot, n)}
}

// decision is one decision as the request path files it. model points to
// a string that is never changed afterwards (a configured name, or a copy
// made for the record), so the ring keeps the pointer and copies nothing.
type decision struct {
	at      time.Time
	model   *string
	outcome Outcome
	reason  Reason
	status  int // the HTTP status vgw answered with; 0 when it answered none
	depth   int // the model's queue depth
	wait    time.Duration
	// tenant, like model, is never changed afterwards (a flow table's
	// name); nil when the request's flow is not known.
	tenant   *string
	priority int
}

// record stores a decision.
func (l *DecisionLog) record(d *decision) {
	pos := l.next.Add(1) - 1
	s := &l.slots[pos&l.mask]
	// Two writers meet on a slot only when the ring wraps while one of
	// them is still writing. The older record then gives way: it would be
	// overwritten at once anyway.
	for {
		cur := s.seq.Load()
		if cur >= 2*pos+1 {
			return // a newer record holds or is taking the slot
		}
		if cur%2 == 1 {
			runtime.Gosched() // an older writer is mid-write
			continue
		}
		if s.seq.CompareAndSwap(cur, 2*pos+1) {
			break
		}
	}
	s.at.Store(d.at.UnixNano())
	s.wait.Store(int64(d.wait))
	s.packed.Store(uint64(d.outcome)<<56 | uint64(d.reason)<<48 | uint64(uint16(d.status))<<32 | uint64(uint32(d.depth)))
	s.model.Store(d.model)
	s.tenant.Store(d.tenant)
	s.priority.Store(int64(d.priority))
	s.seq.Store(2*pos + 2)
}

// Filter selects decisions in Recent; zero fields match everything.
type Filter struct {
	Model   string
	Tenant  string
	Outcome Outcome
	Limit   int // at most this many; 0 means the whole ring
}

// Recent returns the newest decisions first. Slots being overwritten while
// it reads are skipped rather than waited for.
func (l *DecisionLog) Recent(f Filter) []Decision {
	end := l.next.Load()
	n := uint64(len(l.slots))
	start := uint64(0)
	if end > n {
		start = end - n
	}
	var out []Decision
	for pos := end; pos > start; {
		pos--
		s := &l.slots[pos&l.mask]
		if s.seq.Load() != 2*pos+2 {
			continue
		}
		d := Decision{Time: time.Unix(0, s.at.Load())}
		d.Wait = time.Duration(s.wait.Load())
		p := s.packed.Load()
		d.Outcome, d.Reason = Outcome(p>>56), Reason(p>>48)
		d.Status, d.QueueDepth = int(uint16(p>>32)), int(uint32(p))
		if m := s.model.Load(); m != nil {
			d.Model = *m
		}
		if t := s.tenant.Load(); t != nil {
			d.Tenant = *t
		}
		d.Priority = int(s.priority.Load())
		if s.seq.Load() != 2*pos+2 {
			continue // overwritten while we read it
		}
		if (f.Model != "" && d.Model != f.Model) || (f.Tenant != "" && d.Tenant != f.Tenant) || (f.Outcome != 0 && d.Outcome != f.Outcome) {
			continue
		}
		out = append(out, d)
		if f.Limit > 0 && len(out) == f.Limit {
			break
		}
	}
	return out
}
