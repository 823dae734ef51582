package main

import (
	"slices"
	"testing"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/extproc"
)

// TestFairnessNamesAgree: config and extproc each spell the fair queues'
// names (extproc imports nothing of vgw's); they must spell them alike,
// or validation would accept tenants the request path never matches.
func TestFairnessNamesAgree(t *testing.T) {
	for _, p := range [][2]string{
		{config.DefaultTenantHeader, extproc.DefaultTenantHeader},
		{config.DefaultObjectiveHeader, extproc.DefaultObjectiveHeader},
		{config.DefaultTenant, extproc.DefaultTenant},
		{config.KeyTenantPrefix, extproc.KeyTenantPrefix},
	} {
		if p[0] != p[1] {
			t.Errorf("config says %q, extproc %q", p[0], p[1])
		}
	}
	if !slices.Equal(config.CredentialHeaders, extproc.CredentialHeaders) {
		t.Errorf("credential headers: config %v, extproc %v", config.CredentialHeaders, extproc.CredentialHeaders)
	}
}

// TestFairnessOf: the config's fair queues reach the request path
// resolved: each tenant's weight and cap, budgets, the policy.
func TestFairnessOf(t *testing.T) {
	c, err := config.Parse("c.yaml", []byte(`runtime: {kind: sim}
gpus: [{name: g, memory: 80GiB}]
models: {m: {}}
fairness: vtc
objectives: {hi: 5}
max_queue_per_tenant: 7
tenants:
  b: {weight: 2, max_queue: 0, rpm: 10, tpm: 100}
  a: {}
`))
	if err != nil {
		t.Fatal(err)
	}
	f := fairnessOf(c)
	want := []extproc.Tenant{{Name: "a", Weight: 1, MaxQueue: 7}, {Name: "b", Weight: 2, MaxQueue: 0, RPM: 10, TPM: 100}}
	if !f.VTC || f.MaxQueuePerTenant != 7 || f.Objectives["hi"] != 5 || !slices.Equal(f.Tenants, want) {
		t.Errorf("fairness %+v, want VTC, cap 7, hi 5, tenants %+v", f, want)
	}
}
