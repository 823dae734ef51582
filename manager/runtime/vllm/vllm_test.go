package vllm

import (
	"strings"
	"testing"

	"github.com/vgw-project/vgw/config"
)

func TestArgs(t *testing.T) {
	tests := []struct {
		name        string
		model       config.Model
		utilization float64
		sleep       config.Sleep
		want        string
	}{
		{"the least: repo, name, utilization, one GPU", config.Model{Repo: "org/a"}, 0.9, "",
			"--model org/a --served-model-name a --gpu-memory-utilization 0.9 --tensor-parallel-size 1"},
		{"every setting, extra_args last",
			config.Model{Repo: "meta-llama/Llama-3.1-8B", MaxModelLen: 8192, MaxNumSeqs: 64, TensorParallelSize: 2, Quantization: "awq", DType: "half", ExtraArgs: []string{"--enforce-eager"}}, 0.45, "",
			"--model meta-llama/Llama-3.1-8B --served-model-name a --gpu-memory-utilization 0.45 --tensor-parallel-size 2 --max-model-len 8192 --max-num-seqs 64 --quantization awq --dtype half --enforce-eager"},
		{"the adapters; aliases are vgw's alone",
			config.Model{Repo: "org/a", Aliases: []string{"gpt-4o-mini", "org/a"}, Adapters: map[string]string{"sql": "/l/sql", "b-lora": "org/b-lora"}, ExtraArgs: []string{"--max-loras", "2"}}, 0.9, "",
			"--model org/a --served-model-name a --gpu-memory-utilization 0.9 --tensor-parallel-size 1 --enable-lora --lora-modules b-lora=org/b-lora sql=/l/sql --max-loras 2"},
		{"utilization written as short as it reads", config.Model{Repo: "org/a"}, 0.63, "",
			"--model org/a --served-model-name a --gpu-memory-utilization 0.63 --tensor-parallel-size 1"},
		{"sleep mode for a level, before extra_args", config.Model{Repo: "org/a", ExtraArgs: []string{"--enforce-eager"}}, 0.9, config.SleepLevel2,
			"--model org/a --served-model-name a --gpu-memory-utilization 0.9 --tensor-parallel-size 1 --enable-sleep-mode --enforce-eager"},
		{"no sleep mode when off", config.Model{Repo: "org/a"}, 0.9, config.SleepOff,
			"--model org/a --served-model-name a --gpu-memory-utilization 0.9 --tensor-parallel-size 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := strings.Join(Args("a", &tt.model, tt.utilization, tt.sleep), " "); got != tt.want {
				t.Errorf("args\n%s\nwant\n%s", got, tt.want)
			}
		})
	}
}
