package manager

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"

	"github.com/vgw-project/vgw/config"
)

// Signature identifies the settings that decide how much memory a model's
// server takes; a footprint learned under another signature is stale.
// LoRA adapters are among them (vLLM reserves memory for them). Settings
// added since signatures were first kept are left out while unset, so
// that a model without them keeps its signature across an upgrade.
func Signature(c *config.Config, m *config.Model) string {
	b, _ := json.Marshal(struct {
		Image, Repo, Quantization, DType string
		MaxModelLen, MaxNumSeqs, TP      int
		Utilization                      float64
		ExtraArgs                        []string
		Adapters                         map[string]string `json:",omitempty"`
	}{c.Runtime.Image, m.Repo, m.Quantization, m.DType, m.MaxModelLen, m.MaxNumSeqs, max(m.TensorParallelSize, 1), m.GPUMemoryUtilization, m.ExtraArgs, m.Adapters})
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// LaunchSignature identifies everything a model's server is started with
// that the config decides: its memory settings (Signature, adapters
// included), the runtime's network, cache, shared memory and env, the
// model's env and GPU pins, and whether sleep mode is on (its level is
// chosen as it falls asleep, so changing it restarts nothing). A server started otherwise is reloaded once
// idle, and not adopted. A model's aliases are not among them: vgw
// renames a request for an alias on its way, so that its server needs
// only its own name.
func LaunchSignature(c *config.Config, m *config.Model) string {
	b, _ := json.Marshal(struct {
		Signature, Network, CacheDir string
		ShmSize                      int64
		RuntimeEnv, Env              map[string]string
		GPUs                         []int
		SleepMode                    bool `json:",omitempty"`
	}{Signature(c, m), c.Runtime.Network, c.Runtime.CacheDir, int64(c.Runtime.ShmSize), c.Runtime.Env, m.Env, m.GPUs, c.SleepFor(m).Level() > 0})
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}
