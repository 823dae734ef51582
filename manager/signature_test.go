package manager

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"testing"

	"github.com/vgw-project/vgw/config"
)

// TestSignatures: what a model's server is started with decides its
// signatures. An adapter it must answer to is part of them, so a server
// started without one is not adopted; aliases are not (vgw renames them
// on the way), and a model without adapters keeps the signatures servers
// were started with before vgw knew of names.
func TestSignatures(t *testing.T) {
	c := &config.Config{Runtime: config.Runtime{Image: "vllm", Network: "vgw"}}
	base := config.Model{}
	sig, launch := Signature(c, &base), LaunchSignature(c, &base)

	// The launch signature as vgw computed it before names (c557b01).
	b, _ := json.Marshal(struct {
		Signature, Network, CacheDir string
		ShmSize                      int64
		RuntimeEnv, Env              map[string]string
		GPUs                         []int
	}{sig, c.Runtime.Network, c.Runtime.CacheDir, int64(c.Runtime.ShmSize), c.Runtime.Env, base.Env, base.GPUs})
	sum := sha256.Sum256(b)
	if old := hex.EncodeToString(sum[:8]); launch != old {
		t.Errorf("a model without adapters: launch signature %s, was %s", launch, old)
	}
	tests := []struct {
		name          string
		m             config.Model
		sigChanges    bool
		launchChanges bool
	}{
		{"an alias", config.Model{Aliases: []string{"gpt"}}, false, false},
		{"another repo", config.Model{Repo: "org/a"}, true, true},
		{"an adapter", config.Model{Adapters: map[string]string{"sql": "/l/sql"}}, true, true},
		{"the key repeated as an alias", config.Model{Aliases: []string{"a"}}, false, false},
		{"request defaults", config.Model{RequestDefaults: map[string]any{"temperature": 0.1}}, false, false},
		{"sleep off", config.Model{Sleep: config.SleepOff}, false, false},
		{"sleep mode on", config.Model{Sleep: config.SleepLevel1}, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Signature(c, &tt.m) != sig; got != tt.sigChanges {
				t.Errorf("signature changed %v, want %v", got, tt.sigChanges)
			}
			if got := LaunchSignature(c, &tt.m) != launch; got != tt.launchChanges {
				t.Errorf("launch signature changed %v, want %v", got, tt.launchChanges)
			}
		})
	}
	// The level is chosen as a server falls asleep: no restart for it.
	l1, l2 := config.Model{Sleep: config.SleepLevel1}, config.Model{Sleep: config.SleepLevel2}
	if LaunchSignature(c, &l1) != LaunchSignature(c, &l2) {
		t.Error("level1 and level2 launch differently")
	}
	// The gateway's setting counts as the model's own.
	cs := *c
	cs.Sleep = config.SleepLevel2
	if LaunchSignature(&cs, &base) != LaunchSignature(c, &l2) {
		t.Error("the gateway's sleep setting does not reach the launch signature")
	}
}
