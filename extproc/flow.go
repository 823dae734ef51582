package extproc

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"slices"
)

// Fairness is how the requests of many tenants share each model's queue.
// A request's flow is its tenant and its priority. Priorities are served
// strictly, higher first; the tenants of one priority fairly, in
// proportion to their weights; one tenant's requests in the order they
// came. The semantics are the Gateway API Inference Extension's flow
// control (pkg/epp/flowcontrol), whose headers vgw reads, with three
// additions: weights, a cap per tenant, and displacement when the queue
// is full (see gate.enqueue).
type Fairness struct {
	// TenantHeader names the request header that says who sent the
	// request (DefaultTenantHeader when empty). A credential header
	// (CredentialHeaders) names its key's id instead: KeyTenantPrefix
	// and a hash, never the key.
	TenantHeader string
	// ObjectiveHeader names the header whose value, an objective's name,
	// sets the request's priority (DefaultObjectiveHeader when empty).
	ObjectiveHeader string
	// Objectives maps each objective to its priority, higher first. A
	// request with no objective, or one not listed, has priority 0.
	Objectives map[string]int
	// Tenants are the configured tenants. Every other request, and one
	// that names no tenant, is DefaultTenant's, whose settings may be
	// given here too (weight 1 and MaxQueuePerTenant otherwise).
	Tenants []Tenant
	// MaxQueuePerTenant caps each tenant's requests waiting for a model,
	// where the tenant gives no cap of its own; 0 sets none.
	MaxQueuePerTenant int
	// VTC picks the next tenant by virtual token counter (the least
	// served so far, charged by request bytes over weight) instead of
	// weighted round robin.
	VTC bool
}

// Tenant is one configured tenant.
type Tenant struct {
	Name string
	// Weight is its share against the other tenants of a priority (1
	// when 0).
	Weight int
	// MaxQueue caps its requests waiting for each model: -1 leaves it to
	// Fairness.MaxQueuePerTenant, 0 sets no cap.
	MaxQueue int
	// RPM and TPM are its budgets of requests and of tokens per minute,
	// over all models; 0 sets none. Over either, a request is answered
	// 429 with a Retry-After that says when the budget has refilled
	// enough. Tokens are counted from the usage the model reports at the
	// end of each response, which costs every response of the tenant a
	// round trip to vgw per chunk (see stream.meter).
	RPM, TPM int
}

// Header names, the shared tenant's name and key ids, as in the config
// (see config/fairness.go, which documents them).
const (
	DefaultTenantHeader    = "x-gateway-inference-fairness-id"
	DefaultObjectiveHeader = "x-gateway-inference-objective"
	DefaultTenant          = "default-flow"
	KeyTenantPrefix        = "sha256:"
)

// CredentialHeaders are the headers that carry an API key.
var CredentialHeaders = []string{"authorization", "proxy-authorization", "x-api-key", "api-key"}

// flowTable is a Fairness resolved for the request path: immutable,
// swapped whole on reload. Tenants and priorities are indexes into its
// slices, so that each model's gate keeps its flows in slices too.
type flowTable struct {
	tenantHeader, objectiveHeader string
	keyed                         bool // the tenant header carries a key: hash it
	tenants                       []tenantSpec
	byName                        map[string]uint16 // tenant index by name
	priorities                    []int             // by band, highest first
	objectives                    map[string]uint8  // band by objective
	defaultBand                   uint8             // priority 0's
	vtc                           bool
}

// tenantSpec is a tenant as its flows need it. Index 0 is DefaultTenant.
type tenantSpec struct {
	name     string
	weight   int
	maxQueue int     // 0: no cap
	rpm, tpm *budget // nil: none
}

// flowKey is a request's flow: its tenant and band in table t.
type flowKey struct {
	t      *flowTable
	tenant uint16
	band   uint8
}

// newFlowTable resolves f. A tenant's budgets carry over from prev (nil
// for none) where their rates stay, so that a reload neither refills nor
// empties them.
func newFlowTable(f Fairness, prev *flowTable) *flowTable {
	t := &flowTable{
		tenantHeader:    f.TenantHeader,
		objectiveHeader: f.ObjectiveHeader,
		byName:          map[string]uint16{},
		objectives:      map[string]uint8{},
		vtc:             f.VTC,
	}
	if t.tenantHeader == "" {
		t.tenantHeader = DefaultTenantHeader
	}
	if t.objectiveHeader == "" {
		t.objectiveHeader = DefaultObjectiveHeader
	}
	t.keyed = slices.Contains(CredentialHeaders, t.tenantHeader)
	spec := func(x Tenant) tenantSpec {
		s := tenantSpec{name: x.Name, weight: max(x.Weight, 1), maxQueue: x.MaxQueue}
		if s.maxQueue < 0 {
			s.maxQueue = max(f.MaxQueuePerTenant, 0)
		}
		var was tenantSpec
		if i, ok := prev.tenant(x.Name); ok {
			was = prev.tenants[i]
		}
		s.rpm, s.tpm = keepBudget(was.rpm, x.RPM), keepBudget(was.tpm, x.TPM)
		return s
	}
	t.tenants = []tenantSpec{spec(Tenant{Name: DefaultTenant, MaxQueue: -1})}
	t.byName[DefaultTenant] = 0
	for _, x := range f.Tenants {
		if x.Name == DefaultTenant {
			t.tenants[0] = spec(x)
			continue
		}
		if _, dup := t.byName[x.Name]; dup || len(t.tenants) > 1<<16-1 {
			continue
		}
		t.byName[x.Name] = uint16(len(t.tenants))
		t.tenants = append(t.tenants, spec(x))
	}
	t.priorities = []int{0}
	for _, p := range f.Objectives {
		if !slices.Contains(t.priorities, p) {
			t.priorities = append(t.priorities, p)
		}
	}
	slices.Sort(t.priorities)
	slices.Reverse(t.priorities)
	if len(t.priorities) > 256 { // the config allows 16
		t.priorities = t.priorities[:255]
		if !slices.Contains(t.priorities, 0) {
			t.priorities = append(t.priorities, 0) // below every one kept
		}
	}
	t.defaultBand = t.band(0)
	for name, p := range f.Objectives {
		t.objectives[name] = t.band(p)
	}
	return t
}

// tenant returns the index of the tenant named name, if t has one.
func (t *flowTable) tenant(name string) (uint16, bool) {
	if t == nil {
		return 0, false
	}
	i, ok := t.byName[name]
	return i, ok
}

// keepBudget returns b if it is of the rate perMinute, else a new budget
// of that rate (nil for none) that carries b's debt over: what b has
// spent ahead, in time, at the new rate.
func keepBudget(b *budget, perMinute int) *budget {
	switch {
	case perMinute <= 0:
		return nil
	case b != nil && b.rate == perMinute:
		return b
	}
	nb := newBudget(perMinute)
	if b != nil {
		nb.tat.Store(b.tat.Load())
	}
	return nb
}

// band returns the band of priority p, or the default band when p has
// none.
func (t *flowTable) band(p int) uint8 {
	if i := slices.Index(t.priorities, p); i >= 0 {
		return uint8(i)
	}
	return t.defaultBand
}

// key resolves a request's flow from its tenant and objective headers'
// values (nil when absent). It allocates nothing.
func (t *flowTable) key(tenant, objective []byte) flowKey {
	k := flowKey{t: t, band: t.defaultBand}
	if b, ok := t.objectives[string(objective)]; ok && objective != nil {
		k.band = b
	}
	if len(tenant) == 0 {
		return k
	}
	if t.keyed {
		id, ok := keyID(tenant)
		if !ok {
			return k
		}
		tenant = id[:]
	}
	k.tenant = t.byName[string(tenant)] // 0, the shared flow, when unknown
	return k
}

// keyIDLen is the length of a key's id: the prefix and 16 hex digits.
const keyIDLen = len(KeyTenantPrefix) + 16

// keyID returns the id of the API key a credential header carries: the
// token of a bearer authorization, or the whole value, hashed; false for
// an empty key. The key itself is never kept.
func keyID(v []byte) (id [keyIDLen]byte, ok bool) {
	if len(v) > 7 && bytes.EqualFold(v[:7], []byte("bearer ")) {
		v = bytes.TrimLeft(v[7:], " ")
	}
	if len(v) == 0 {
		return id, false
	}
	sum := sha256.Sum256(v)
	copy(id[:], KeyTenantPrefix)
	hex.Encode(id[len(KeyTenantPrefix):], sum[:8])
	return id, true
}

// translate finds k's flow in table to: the same tenant by name (or the
// shared one) and the same priority (or the default). A request whose
// key was read under one table may queue in a gate that has taken the
// next one since.
func (k flowKey) translate(to *flowTable) flowKey {
	switch k.t {
	case to:
		return k
	case nil:
		return flowKey{t: to, band: to.defaultBand}
	}
	return flowKey{t: to, tenant: to.byName[k.t.tenants[k.tenant].name], band: to.band(k.t.priorities[k.band])}
}
