// Package vllm is vLLM's command line as vgw starts it: the runtimes that
// run vLLM (docker) or stand in for it (sim, whose fake is handed the same
// arguments) build it from a model's settings here, so that the manager
// need not know vLLM's flags.
package vllm

import (
	"maps"
	"slices"
	"strconv"

	"github.com/vgw-project/vgw/config"
)

// Args builds the vLLM server arguments for a model: the flags vgw
// manages, then the model's extra_args (which config validation keeps
// from overriding them). utilization is the --gpu-memory-utilization the
// manager computed for the GPUs it placed the model on.
//
// The server answers to the model's own name (--served-model-name) and
// to its adapters (--enable-lora, a --lora-modules entry NAME=SOURCE
// each); vgw renames a request for an alias or the repo to the model's
// own name on its way, so that changing aliases restarts nothing. With
// a sleep level it starts in sleep mode (--enable-sleep-mode), whose
// endpoints also need the environment's VLLM_SERVER_DEV_MODE=1 (Env).
func Args(name string, m *config.Model, utilization float64, sleep config.Sleep) []string {
	args := []string{"--model", m.Repo, "--served-model-name", name}
	args = append(args,
		"--gpu-memory-utilization", strconv.FormatFloat(utilization, 'f', -1, 64),
		"--tensor-parallel-size", strconv.Itoa(max(m.TensorParallelSize, 1)),
	)
	if m.MaxModelLen > 0 {
		args = append(args, "--max-model-len", strconv.Itoa(m.MaxModelLen))
	}
	if m.MaxNumSeqs > 0 {
		args = append(args, "--max-num-seqs", strconv.Itoa(m.MaxNumSeqs))
	}
	if m.Quantization != "" {
		args = append(args, "--quantization", m.Quantization)
	}
	if m.DType != "" {
		args = append(args, "--dtype", m.DType)
	}
	if len(m.Adapters) > 0 {
		args = append(args, "--enable-lora", "--lora-modules")
		for _, a := range slices.Sorted(maps.Keys(m.Adapters)) {
			args = append(args, a+"="+m.Adapters[a])
		}
	}
	if sleep.Level() > 0 {
		args = append(args, "--enable-sleep-mode")
	}
	return append(args, m.ExtraArgs...)
}

// Env is what vLLM's environment needs for a sleep setting: with a level,
// VLLM_SERVER_DEV_MODE=1, without which vLLM serves no /sleep or
// /wake_up (docs/features/sleep_mode.md). Those endpoints are never
// reachable from clients: Envoy's catch-all route answers every path it
// does not route to a model (envoy/envoy.yaml).
func Env(sleep config.Sleep) map[string]string {
	if sleep.Level() == 0 {
		return nil
	}
	return map[string]string{"VLLM_SERVER_DEV_MODE": "1"}
}
