package vllm

import (
	"regexp"
	"strconv"
	"strings"
)

// A cold start of vLLM takes minutes (download, weights, torch.compile,
// CUDA graphs), and its log says where it stands. Progress reads that
// from its lines, as vLLM 0.10–0.11 writes them (gpu_model_runner.py,
// default_loader.py, backends.py, monitor.py, gpu_worker.py; the
// checkpoint-shard and CUDA-graph bars are tqdm's, and so are
// huggingface_hub's download bars), for status to show.

// Phase is a stage of a vLLM server's start.
type Phase uint8

const (
	PhaseUnknown     Phase = iota
	PhaseDownloading       // fetching the weights from the Hugging Face hub
	PhaseLoading           // loading the weights onto the GPUs
	PhaseCompiling         // torch.compile
	PhaseProfiling         // measuring memory, sizing the KV cache
	PhaseCapturing         // capturing CUDA graphs
	PhaseReady             // the API server is up
)

var phaseNames = [...]string{"", "downloading", "loading_weights", "compiling", "profiling", "capturing_graphs", "ready"}

func (p Phase) String() string {
	if int(p) < len(phaseNames) {
		return phaseNames[p]
	}
	return "unknown"
}

// Progress is where a start stands: its phase, and how far through it
// (0-100), or -1 where the line does not say.
type Progress struct {
	Phase   Phase
	Percent float64
}

// lineRules map a line to progress, most specific first. A bar's count
// (n/m) gives its percentage.
var lineRules = []struct {
	re    *regexp.Regexp
	phase Phase
	done  bool // the line ends its phase: 100%
}{
	{regexp.MustCompile(`Application startup complete`), PhaseReady, true},
	{regexp.MustCompile(`Loading safetensors checkpoint shards:.*\| *(\d+)/(\d+)`), PhaseLoading, false},
	{regexp.MustCompile(`Starting to load model|Loading model from scratch`), PhaseLoading, false},
	{regexp.MustCompile(`Loading weights took|Model loading took`), PhaseLoading, true},
	{regexp.MustCompile(`Capturing CUDA graph.*\| *(\d+)/(\d+)`), PhaseCapturing, false},
	{regexp.MustCompile(`Graph capturing finished`), PhaseCapturing, true},
	{regexp.MustCompile(`torch\.compile takes .* in total`), PhaseCompiling, true},
	{regexp.MustCompile(`for vLLM's torch\.compile|Dynamo bytecode transform time|Compiling a graph for`), PhaseCompiling, false},
	{regexp.MustCompile(`Available KV cache memory|GPU KV cache size|Memory profiling takes`), PhaseProfiling, false},
	{regexp.MustCompile(`(?:Fetching \d+ files|\.safetensors|\.bin|\.pt):.*\| *([\d.]+)([kMG]?)B?/([\d.]+)([kMG]?)B?`), PhaseDownloading, false},
}

// ParseProgress reads a vLLM log line, and reports whether it told
// anything of the start. A progress bar redrawn in place (tqdm's \r) is
// read at its last drawing.
func ParseProgress(line string) (Progress, bool) {
	if i := strings.LastIndexByte(strings.TrimRight(line, "\r\n"), '\r'); i >= 0 {
		line = line[i+1:]
	}
	for _, r := range lineRules {
		m := r.re.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		p := Progress{Phase: r.phase, Percent: -1}
		switch {
		case r.done:
			p.Percent = 100
		case len(m) == 3:
			p.Percent = ratio(m[1], "", m[2], "")
		case len(m) == 5:
			p.Percent = ratio(m[1], m[2], m[3], m[4])
		}
		return p, true
	}
	return Progress{}, false
}

// ratio is n/m as a percentage, each with an optional k, M or G unit; -1
// where it cannot be read.
func ratio(n, nUnit, m, mUnit string) float64 {
	a, err1 := strconv.ParseFloat(n, 64)
	b, err2 := strconv.ParseFloat(m, 64)
	if err1 != nil || err2 != nil || b <= 0 {
		return -1
	}
	scale := map[string]float64{"": 1, "k": 1e3, "M": 1e6, "G": 1e9}
	return min(100, 100*a*scale[nUnit]/(b*scale[mUnit]))
}
