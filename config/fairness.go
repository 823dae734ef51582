package config

import (
	"maps"
	"regexp"
	"slices"
	"strings"
)

// Fair queues. A request's flow is its tenant and its priority: the
// tenant names who sent it (TenantHeader), the priority how urgent it is
// (ObjectiveHeader, mapped through Objectives). Each model's queue serves
// priorities strictly, higher first, and tenants of one priority fairly,
// in proportion to their weights. The header names and the shared flow's
// name are the Gateway API Inference Extension's
// (pkg/epp/metadata/consts.go), so that the same clients work with both.
const (
	DefaultTenantHeader    = "x-gateway-inference-fairness-id"
	DefaultObjectiveHeader = "x-gateway-inference-objective"
	// DefaultTenant is the flow of every request whose tenant is not
	// configured, or that names none: tenants: may give it settings of
	// its own like any other.
	DefaultTenant = "default-flow"
)

// Fairness policies: how a model's queue picks the next tenant within a
// priority.
const (
	// FairRoundRobin serves the tenants waiting in turn, each as many
	// requests per turn as its weight.
	FairRoundRobin = "round_robin"
	// FairVTC serves the tenant that has had the least service so far
	// (its virtual counter, charged by request bytes over its weight),
	// after Sheng et al., "Fairness in Serving Large Language Models"
	// (OSDI 2024).
	FairVTC = "vtc"
)

// Limits on the fairness settings. Each model keeps per band and tenant
// state, and metrics label by tenant: these keep both bounded.
const (
	MaxTenants    = 1000
	MaxPriorities = 16
	MaxWeight     = 1000
)

// Tenant is one configured tenant's share of each model's queue, and its
// budgets across all models.
type Tenant struct {
	// Weight is the tenant's share against the others of its priority:
	// a tenant of weight 3 is served three requests to one of weight 1
	// while both wait. 1 when unset.
	Weight int `yaml:"weight"`
	// MaxQueue caps the tenant's requests waiting for each model; unset,
	// max_queue_per_tenant applies.
	MaxQueue *int `yaml:"max_queue"`
	// RPM and TPM are the tenant's budgets of requests and of tokens per
	// minute, over all models; 0 sets none.
	RPM int `yaml:"rpm"`
	TPM int `yaml:"tpm"`
}

// tenantNamePattern is what a configured tenant may be called: a
// fairness id sent in a header, or a key's id (KeyTenantPrefix), and
// nothing that would not do as a metric label value.
var tenantNamePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:@+/=-]{0,127}$`)

// headerNamePattern is an HTTP field name (RFC 9110 token) as Envoy
// sends it: lower case.
var headerNamePattern = regexp.MustCompile("^[a-z0-9!#$%&'*+.^_`|~-]+$")

// keyTenantPattern is the name of a key's tenant.
var keyTenantPattern = regexp.MustCompile(`^sha256:[0-9a-f]{16}$`)

// CredentialHeaders are the headers that carry an API key. A tenant
// read from one of these is the key's id (KeyTenantPrefix and a hash),
// never the key itself.
var CredentialHeaders = []string{"authorization", "proxy-authorization", "x-api-key", "api-key"}

// KeyTenantPrefix starts the tenant name of an API key: "sha256:" and the
// first 16 hex digits of the key's SHA-256 (the bearer token alone, for
// authorization), as `printf %s "$KEY" | sha256sum | cut -c1-16` prints.
const KeyTenantPrefix = "sha256:"

// FairWeight is a tenant's weight, 1 when unset.
func (t *Tenant) FairWeight() int {
	if t == nil || t.Weight == 0 {
		return 1
	}
	return t.Weight
}

// TenantMaxQueue is how many of a tenant's requests may wait for each
// model: its own max_queue, else max_queue_per_tenant; 0 sets no cap
// beyond the model's max_queue.
func (c *Config) TenantMaxQueue(name string) int {
	if t := c.Tenants[name]; t != nil && t.MaxQueue != nil {
		return *t.MaxQueue
	}
	return c.MaxQueuePerTenant
}

// Priorities returns the distinct priorities requests may have, highest
// first: those of the objectives, and 0, which a request with no
// objective, or one not configured, has.
func (c *Config) Priorities() []int {
	ps := []int{0}
	for _, p := range c.Objectives {
		if !slices.Contains(ps, p) {
			ps = append(ps, p)
		}
	}
	slices.Sort(ps)
	slices.Reverse(ps)
	return ps
}

func (v *validator) fairness(c *Config) {
	for _, h := range []struct{ key, name string }{{"tenant_header", c.TenantHeader}, {"objective_header", c.ObjectiveHeader}} {
		switch {
		case !headerNamePattern.MatchString(h.name):
			v.at([]string{h.key}, "%s %s must be a header name in lower case, as Envoy sends it", h.key, trimmed(h.name))
		case strings.HasPrefix(h.name, "x-vgw-"):
			v.at([]string{h.key}, "%s %s may not be an x-vgw- header: Envoy removes those from clients' requests", h.key, trimmed(h.name))
		case h.name == "content-type" || h.name == "content-length" || h.name == "host":
			v.at([]string{h.key}, "%s %s may not be a header that describes the request itself", h.key, trimmed(h.name))
		}
	}
	if c.TenantHeader == c.ObjectiveHeader {
		v.at([]string{"objective_header"}, "objective_header and tenant_header are both %s", trimmed(c.TenantHeader))
	}
	if slices.Contains(CredentialHeaders, c.ObjectiveHeader) {
		v.at([]string{"objective_header"}, "objective_header %s carries credentials", trimmed(c.ObjectiveHeader))
	}
	if c.Fairness != FairRoundRobin && c.Fairness != FairVTC {
		v.at([]string{"fairness"}, "fairness %s is not %s or %s", trimmed(c.Fairness), FairRoundRobin, FairVTC)
	}
	if c.MaxQueuePerTenant < 0 {
		v.at([]string{"max_queue_per_tenant"}, "max_queue_per_tenant must not be negative (0 sets no cap)")
	}
	for _, name := range slices.Sorted(maps.Keys(c.Objectives)) {
		if name == "" || len(name) > 128 {
			v.at([]string{"objectives"}, "objective names must be 1-128 characters")
		}
		if p := c.Objectives[name]; p < -1000 || p > 1000 {
			v.at([]string{"objectives", name}, "objective %s has priority %d: priorities go from -1000 to 1000", trimmed(name), p)
		}
	}
	if n := len(c.Priorities()); n > MaxPriorities {
		v.at([]string{"objectives"}, "objectives give %d priorities with the default 0; at most %d", n, MaxPriorities)
	}
	if len(c.Tenants) > MaxTenants {
		v.at([]string{"tenants"}, "%d tenants configured; at most %d (the others share %s)", len(c.Tenants), MaxTenants, DefaultTenant)
	}
	keyed := slices.Contains(CredentialHeaders, c.TenantHeader)
	for _, name := range slices.Sorted(maps.Keys(c.Tenants)) {
		t := c.Tenants[name]
		at := func(k ...string) []string { return append([]string{"tenants", name}, k...) }
		if !tenantNamePattern.MatchString(name) {
			v.at(at(), "tenant name %s must be 1-128 of letters, digits and . _ : @ + / = -, starting with a letter or digit", trimmed(name))
		} else if keyed && name != DefaultTenant && !keyTenantPattern.MatchString(name) {
			v.at(at(), "tenant name %s can never match: tenant_header %s carries API keys, and a key's tenant is %s and the first 16 hex digits of its SHA-256", trimmed(name), c.TenantHeader, KeyTenantPrefix)
		}
		if t == nil {
			continue
		}
		if t.Weight < 0 || t.Weight > MaxWeight {
			v.at(at("weight"), "weight must be between 1 and %d, got %d", MaxWeight, t.Weight)
		}
		if t.MaxQueue != nil && *t.MaxQueue < 0 {
			v.at(at("max_queue"), "max_queue must not be negative (0 sets no cap)")
		}
		if t.RPM < 0 || t.TPM < 0 {
			v.at(at(), "rpm and tpm must not be negative (0 sets no budget)")
		}
	}
}
