package config

import (
	"slices"
	"strings"
	"testing"
)

func TestFairness(t *testing.T) {
	const base = "runtime: {kind: sim}\ngpus: [{name: g, memory: 80GiB}]\nmodels: {m: {}}\n"
	c, err := Parse("c.yaml", []byte(base+`
objectives: {interactive: 10, batch: -5, chat: 10}
max_queue_per_tenant: 50
tenants:
  team-a: {weight: 3, rpm: 600}
  team-b: {max_queue: 0}
  "sha256:0123456789abcdef": {}
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.TenantHeader != DefaultTenantHeader || c.ObjectiveHeader != DefaultObjectiveHeader || c.Fairness != FairRoundRobin {
		t.Errorf("defaults: %q %q %q", c.TenantHeader, c.ObjectiveHeader, c.Fairness)
	}
	if got := c.Priorities(); !slices.Equal(got, []int{10, 0, -5}) {
		t.Errorf("priorities %v, want [10 0 -5]", got)
	}
	for _, tt := range []struct {
		tenant      string
		weight, cap int
	}{{"team-a", 3, 50}, {"team-b", 1, 0}, {"sha256:0123456789abcdef", 1, 50}, {"nobody", 1, 50}} {
		if w, q := c.Tenants[tt.tenant].FairWeight(), c.TenantMaxQueue(tt.tenant); w != tt.weight || q != tt.cap {
			t.Errorf("%s: weight %d cap %d, want %d and %d", tt.tenant, w, q, tt.weight, tt.cap)
		}
	}
}

func TestFairnessErrors(t *testing.T) {
	const base = "runtime: {kind: sim}\ngpus: [{name: g, memory: 80GiB}]\nmodels: {m: {}}\n"
	tests := []struct{ name, yaml, want string }{
		{"upper-case header", "tenant_header: X-Tenant\n", "c.yaml:4: tenant_header \"X-Tenant\" must be a header name in lower case"},
		{"vgw header", "objective_header: x-vgw-priority\n", "c.yaml:4: objective_header \"x-vgw-priority\" may not be an x-vgw- header"},
		{"same header", "tenant_header: x-a\nobjective_header: x-a\n", "c.yaml:5: objective_header and tenant_header are both"},
		{"objective from a key", "objective_header: authorization\n", "objective_header \"authorization\" carries credentials"},
		{"policy", "fairness: lottery\n", "c.yaml:4: fairness \"lottery\" is not round_robin or vtc"},
		{"negative cap", "max_queue_per_tenant: -1\n", "c.yaml:4: max_queue_per_tenant must not be negative"},
		{"priority range", "objectives: {x: 5000}\n", "c.yaml:4: objective \"x\" has priority 5000"},
		{"bad tenant name", "tenants: {\"bad name\": {}}\n", "c.yaml:4: tenant name \"bad name\" must be"},
		{"weight", "tenants:\n  a: {weight: -2}\n", "c.yaml:5: weight must be between 1 and 1000"},
		{"budgets", "tenants:\n  a: {rpm: -1}\n", "c.yaml:5: rpm and tpm must not be negative"},
		{"unknown key", "tenants:\n  a: {share: 2}\n", "c.yaml:5: unknown field \"share\""},
		{"a header vgw reads itself", "tenant_header: content-type\n", "c.yaml:4: tenant_header \"content-type\" may not be a header that describes the request itself"},
		{"a name no key has", "tenant_header: authorization\ntenants:\n  team-a: {}\n", "c.yaml:6: tenant name \"team-a\" can never match"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("c.yaml", []byte(base+tt.yaml))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want %q", err, tt.want)
			}
		})
	}
}
