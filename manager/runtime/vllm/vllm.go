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
// own name on its way, so that changing aliases restarts nothing.
func Args(name string, m *config.Model, utilization float64) []string {
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
	return append(args, m.ExtraArgs...)
}
