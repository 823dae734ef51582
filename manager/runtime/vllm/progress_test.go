package vllm

import "testing"

// TestParseProgress reads the lines of a real vLLM 0.11 cold start.
func TestParseProgress(t *testing.T) {
	tests := []struct {
		line    string
		phase   Phase
		percent float64
		ok      bool
	}{
		{"(APIServer pid=1) INFO 01-23 15:48:40 [api_server.py:1839] vLLM API server version 0.11.0", 0, 0, false},
		{"model-00001-of-00004.safetensors:  35%|███▌      | 1.75G/5.00G [00:10<00:19, 170MB/s]", PhaseDownloading, 35, true},
		{"Fetching 4 files:  50%|█████     | 2/4 [00:30<00:30,  15.0s/it]", PhaseDownloading, 50, true},
		{"(EngineCore_DP0 pid=164) INFO 01-23 15:48:47 [gpu_model_runner.py:2602] Starting to load model /models/mistral-7b...", PhaseLoading, -1, true},
		{"Loading safetensors checkpoint shards:  25% Completed | 1/4 [00:04<00:12,  4.10s/it]", PhaseLoading, 25, true},
		{"Loading safetensors checkpoint shards:   0% Completed | 0/4 [00:00<?, ?it/s]\rLoading safetensors checkpoint shards:  75% Completed | 3/4 [00:12<00:04,  4.10s/it]", PhaseLoading, 75, true},
		{"(EngineCore_DP0 pid=164) INFO 01-23 15:49:07 [default_loader.py:267] Loading weights took 19.62 seconds", PhaseLoading, 100, true},
		{"(EngineCore_DP0 pid=164) INFO 01-23 15:49:11 [backends.py:548] Using cache directory: /root/.cache/vllm/torch_compile_cache/d865434b5b/rank_0_0/backbone for vLLM's torch.compile", PhaseCompiling, -1, true},
		{"(EngineCore_DP0 pid=164) INFO 01-23 15:49:22 [backends.py:218] Compiling a graph for dynamic shape takes 10.00 s", PhaseCompiling, -1, true},
		{"(EngineCore_DP0 pid=164) INFO 01-23 15:49:41 [monitor.py:34] torch.compile takes 13.29 s in total", PhaseCompiling, 100, true},
		{"(EngineCore_DP0 pid=164) INFO 01-23 15:50:05 [gpu_worker.py:298] Available KV cache memory: 102.56 GiB", PhaseProfiling, -1, true},
		{"Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):  45%|████▍     | 30/67 [00:05<00:06,  5.43it/s]", PhaseCapturing, 100 * 30.0 / 67, true},
		{"(EngineCore_DP0 pid=164) INFO 01-23 15:50:29 [gpu_model_runner.py:3480] Graph capturing finished in 18 secs, took -0.03 GiB", PhaseCapturing, 100, true},
		{"(APIServer pid=1) INFO:     Application startup complete.", PhaseReady, 100, true},
	}
	for _, tt := range tests {
		got, ok := ParseProgress(tt.line)
		if ok != tt.ok || ok && (got.Phase != tt.phase || got.Percent < tt.percent-0.01 || got.Percent > tt.percent+0.01) {
			t.Errorf("%.60q: %v %v, want %v %v", tt.line, got, ok, Progress{tt.phase, tt.percent}, tt.ok)
		}
	}
}

// FuzzParseProgress: any line is read without a panic, and a percentage
// is -1 or within 0-100.
func FuzzParseProgress(f *testing.F) {
	f.Add("Capturing CUDA graphs (decode, FULL):  10%| | 3/35 [00:01]")
	f.Add("x.safetensors: 1%| | 0.5k/1G")
	f.Fuzz(func(t *testing.T, line string) {
		if p, ok := ParseProgress(line); ok && p.Percent != -1 && (p.Percent < 0 || p.Percent > 100) {
			t.Fatalf("%q: %v", line, p)
		}
	})
}
