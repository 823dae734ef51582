package config

import (
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestExample(t *testing.T) {
	c, err := Load("../examples/sim.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if c.Runtime.Kind != "sim" || len(c.GPUs.Declared) != 2 || c.GPUs.Declared[0].Memory != 48<<30 {
		t.Fatalf("runtime %+v gpus %+v", c.Runtime, c.GPUs)
	}
	if got := c.LimitsOf("qwen2.5-32b"); got != (Limits{MaxConcurrent: 4, MaxQueue: 16, QueueTimeout: 30 * time.Second}) {
		t.Errorf("qwen limits %+v", got)
	}
	if got := c.LimitsOf("mistral-7b"); got != (Limits{MaxConcurrent: 8, MaxQueue: 32, QueueTimeout: 30 * time.Second}) {
		t.Errorf("mistral limits %+v, want the gateway defaults", got)
	}
	if c.MaxBodyBytes != 8<<20 || c.Envoy.MaxMessageTimeout.Std() != 900*time.Second {
		t.Errorf("max body %v, max message timeout %v", c.MaxBodyBytes, c.Envoy.MaxMessageTimeout)
	}
}

func TestDefaults(t *testing.T) {
	c, err := Parse("min.yaml", []byte("runtime: {kind: sim}\ngpus: [{name: g, memory: 1GiB}]\nmodels:\n  m: {}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != Defaults.Listen || c.MaxConcurrent != 50 || c.MaxQueue != 200 || c.LoadTimeout.Std() != 10*time.Minute {
		t.Fatalf("defaults not applied: %+v", c)
	}
}

// TestErrors checks that each mistake is reported at its file and line.
func TestErrors(t *testing.T) {
	const base = "runtime: {kind: sim}\ngpus: [{name: g, memory: 80GiB}]\n"
	tests := []struct {
		name string
		yaml string
		want string // file:line: message fragment
	}{
		{"unknown top-level key", base + "max_concurent: 3\nmodels: {m: {}}\n", `c.yaml:3: unknown field "max_concurent"`},
		{"unknown model key", base + "models:\n  m:\n    rep: x\n", `c.yaml:5: unknown field "rep"`},
		{"wrong type", base + "max_queue: lots\nmodels: {m: {}}\n", "c.yaml:3:"},
		{"bad duration", base + "queue_timeout: soon\nmodels: {m: {}}\n", "c.yaml:3:"},
		{"bad memory", "runtime: {kind: sim}\ngpus: [{name: g, memory: lots}]\nmodels: {m: {}}\n", "c.yaml:2:"},
		{"bad gpus word", "runtime: {kind: sim}\ngpus: some\nmodels: {m: {}}\n", "c.yaml:2:"},
		{"no models", base, "c.yaml: no models configured"},
		{"zero concurrency", base + "max_concurrent: 0\nmodels: {m: {}}\n", "c.yaml:3: max_concurrent must be at least 1"},
		{"model override", base + "models:\n  m:\n    max_concurrent: 0\n", "c.yaml:5: max_concurrent must be at least 1"},
		{"bad model name", base + "models:\n  \"a b\": {}\n", "c.yaml:4: model name"},
		{"dotdot model name", base + "models:\n  ../etc: {}\n", "c.yaml:4: model name"},
		{"managed flag", base + "models:\n  m:\n    extra_args: [--max-num-seqs=9]\n", "c.yaml:5: extra_args may not set --max-num-seqs"},
		{"managed flag, second arg", base + "models:\n  m:\n    extra_args:\n      - --enforce-eager\n      - --gpu-memory-utilization\n", "c.yaml:7: extra_args may not set --gpu-memory-utilization"},
		{"managed flag, underscores", base + "models:\n  m:\n    extra_args: [--max_model_len, \"9\"]\n", "c.yaml:5: extra_args may not set --max-model-len"},
		{"managed flag, alias", base + "models:\n  m:\n    extra_args: [-tp, \"2\"]\n", "c.yaml:5: extra_args may not set --tensor-parallel-size"},
		{"log level", base + "log_level: loud\nmodels: {m: {}}\n", "c.yaml:3: log_level"},
		{"listen address", base + "listen: {extproc: nowhere}\nmodels: {m: {}}\n", "c.yaml:3: listen.extproc"},
		{"docker needs image", "models: {m: {repo: x}}\n", "c.yaml: the docker runtime needs runtime.image"},
		{"docker instance", "runtime: {kind: docker, image: vllm, instance: \"my vgw\"}\nmodels: {m: {repo: x}}\n", "c.yaml:1: runtime.instance"},
		{"empty", "", "c.yaml: the file is empty"},
		{"only comments", "# models:\n#   a: {}\n", "c.yaml: the file is empty"},
		{"only a tag", "--- !x\n", "c.yaml:1: tag was used where mapping is expected"},
		{"syntax", "models: {a: [\n", "c.yaml:1:"},
		// go-yaml alone dropped a mapping with a non-string key whole, and
		// silently: max_model_len fell back to its default.
		{"non-string key", base + "models:\n  m: {max_model_len: 5, 1: 2}\n", `c.yaml:4: unknown field "1"`},
		{"every unknown key, in order", base + "models:\n  m: {zz: 1, aa: 2}\n", `c.yaml:4: unknown field "zz"`},
		{"a tag where a list belongs", base + "models:\n  m:\n    extra_args: !x bar\n", "c.yaml:5: tag was used where sequence is expected"},
		{"docker cache dir", "runtime: {kind: docker, image: vllm, cache_dir: cache}\nmodels: {m: {repo: x}}\n", "c.yaml:1: runtime.cache_dir"},
		{"docker network", "runtime: {kind: docker, image: vllm, network: \"\"}\nmodels: {m: {repo: x}}\n", "c.yaml:1: the docker runtime needs runtime.network"},
		{"docker needs repo", "runtime: {kind: docker, image: vllm}\nmodels:\n  m: {}\n", "c.yaml:3: model \"m\" needs repo"},
		{"tp too wide", base + "models:\n  m:\n    tensor_parallel_size: 2\n", "c.yaml:5: tensor_parallel_size 2 exceeds"},
		{"pin mismatch", base + "models:\n  m:\n    gpus: [0, 0]\n", "c.yaml:5: gpus pins 2 GPUs"},
		{"max message timeout", base + "envoy: {max_message_timeout: 1s}\nmodels: {m: {}}\n", "c.yaml:3: envoy.max_message_timeout"},
		// Envoy's idle timer runs through vgw's wait, then again through
		// the model's time to its first byte: it must cover each.
		{"idle timeout under the wait", base + "envoy: {stream_idle_timeout: 600s}\nmodels: {m: {}}\n", "c.yaml:3: envoy.stream_idle_timeout must be 0 (none) or at least the longest vgw holds a request (envoy.max_message_timeout, or message_timeout without it) and envoy.first_byte_budget (15m0s)"},
		{"idle timeout under the first byte", base + "envoy: {first_byte_budget: 20m}\nmodels: {m: {}}\n", "c.yaml:3: envoy.stream_idle_timeout must be 0 (none) or at least the longest vgw holds a request (envoy.max_message_timeout, or message_timeout without it) and envoy.first_byte_budget (20m0s)"},
		// Without max_message_timeout vgw holds a request up to message_timeout.
		{"idle timeout under message_timeout", base + "envoy: {message_timeout: 30m, max_message_timeout: 0s, stream_idle_timeout: 20m}\nmodels: {m: {}}\n", "c.yaml:3: envoy.stream_idle_timeout must be 0 (none) or at least the longest vgw holds a request (envoy.max_message_timeout, or message_timeout without it) and envoy.first_byte_budget (30m0s)"},
		{"message timeout over Envoy's bound", base + "envoy: {message_timeout: 2h, max_message_timeout: 0s, stream_idle_timeout: 0s}\nmodels: {m: {}}\n", "c.yaml:3: envoy.message_timeout must be at most 1h"},
		// A sum would wrap; the rule takes the longer of the two.
		{"huge first byte budget", base + "envoy: {stream_idle_timeout: 1s, first_byte_budget: 2562047h47m}\nmodels: {m: {}}\n", "c.yaml:3: envoy.stream_idle_timeout must be 0 (none)"},
		{"negative first byte budget", base + "envoy: {first_byte_budget: -1s}\nmodels: {m: {}}\n", "c.yaml:3: envoy.first_byte_budget must not be negative"},
		{"utilization", base + "models:\n  m:\n    gpu_memory_utilization: 1.5\n", "c.yaml:5: gpu_memory_utilization"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("c.yaml", []byte(tt.yaml))
			if err == nil {
				t.Fatal("Parse accepted the config")
			}
			var le *ListError
			if !errors.As(err, &le) {
				t.Fatalf("error %T %v, want a *ListError", err, err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error:\n%v\nwant it to contain %q", err, tt.want)
			}
		})
	}
}

// TestIdleTimeoutFitsWaitAndFirstByte: stream_idle_timeout must cover the
// longer of vgw's wait and the model's first byte, not their sum: Envoy
// restarts the timer between them.
func TestIdleTimeoutFitsWaitAndFirstByte(t *testing.T) {
	c, err := Parse("c.yaml", []byte("runtime: {kind: sim}\ngpus: [{name: g, memory: 1GiB}]\nenvoy: {stream_idle_timeout: 960s, first_byte_budget: 16m}\nmodels: {m: {}}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Envoy.FirstByteBudget.Std(); got != 16*time.Minute {
		t.Fatalf("first_byte_budget %v, want 16m", got)
	}
}

func TestAllProblemsReported(t *testing.T) {
	_, err := Parse("c.yaml", []byte("runtime: {kind: sim}\ngpus: [{name: g, memory: 1GiB}]\nmax_concurrent: 0\nmax_queue: -1\nmodels:\n  m: {}\n"))
	var le *ListError
	if !errors.As(err, &le) || len(le.Problems) != 2 || le.Problems[0].Line != 3 || le.Problems[1].Line != 4 {
		t.Fatalf("got %v, want two problems at lines 3 and 4", err)
	}
}

func TestApplyEnv(t *testing.T) {
	c := Defaults
	c.ApplyEnv(func(k string) string {
		if k == "VGW_EXTPROC_ADDR" {
			return "0.0.0.0:9002"
		}
		return ""
	})
	if c.Listen.ExtProc != "0.0.0.0:9002" || c.Listen.Admin != Defaults.Listen.Admin {
		t.Fatalf("listen %+v", c.Listen)
	}
}

func TestParseBytes(t *testing.T) {
	for in, want := range map[string]Bytes{"1024": 1024, "80GiB": 80 << 30, "80Gi": 80 << 30, "1.5 GiB": 3 << 29, "2GB": 2e9, "512MiB": 512 << 20} {
		got, err := ParseBytes(in)
		if err != nil || got != want {
			t.Errorf("ParseBytes(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "GiB", "-1GiB", "lots", "1e30TiB"} {
		if _, err := ParseBytes(in); err == nil {
			t.Errorf("ParseBytes(%q) accepted", in)
		}
	}
}

// FuzzParse holds Parse to what the rest of vgw assumes of a config it
// accepted: limits that admit something, model names safe to put in
// headers, logs and container labels, and the same answer every time, so
// that vgw validate and vgw serve never disagree on one file.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"runtime: {kind: sim}\ngpus: [{name: g, memory: 80GiB}]\nmodels: {m: {}}\n",
		"models:\n  a/b:\n    extra_args: [--x]\n    gpus: [0]\n",
		"gpus: auto\n",
		"max_body_bytes: 8MiB\nenvoy: {max_message_timeout: 10m}\n",
		"runtime: {kind: sim}\ngpus: [{name: g, memory: 80GiB}]\nmodels: {a..b: {}, \"-x\": {}, \"a b\": {}}\n",
		// Problems on one line came out in map order.
		"listen: {extproc: x, xds: y, admin: z, http: w}\nmodels: {m: {max_model_len: -1, max_num_seqs: -1, tensor_parallel_size: -1}}\n",
		// go-yaml named one of several unknown keys at random.
		"    A:\n    B: 0",
		// go-yaml dropped a mapping with a non-string key: max_model_len was lost.
		"runtime: {kind: sim}\ngpus: [{name: g, memory: 80GiB}]\nmodels: {m: {max_model_len: 5, 1: 2}}\n",
		// go-yaml panicked on a tagged scalar where a list belongs, directly
		// or through an alias.
		"models:\n  m:\n    extra_args: !x bar\n",
		"models: {m: {repo: &a !x foo, extra_args: *a}}\n",
		// NaN passed the range checks.
		"runtime: {kind: sim}\ngpus: [{name: g, memory: 80GiB}]\nmodels: {m: {gpu_memory_utilization: .nan, vram: NaN, sim: {tokens_per_second: .nan}}}\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse("f.yaml", data)
		again, errAgain := Parse("f.yaml", data)
		if (err == nil) != (errAgain == nil) || (err != nil && err.Error() != errAgain.Error()) {
			t.Fatalf("Parse is not deterministic:\n%v\nthen\n%v", err, errAgain)
		}
		if err != nil {
			if err.Error() == "" {
				t.Fatal("Parse failed with an empty error")
			}
			return
		}
		if c.MaxConcurrent < 1 || len(c.Models) == 0 {
			t.Fatalf("accepted an invalid config: %+v", c)
		}
		for name := range c.Models {
			if !ModelNamePattern.MatchString(name) || strings.Contains(name, "..") {
				t.Fatalf("accepted model name %q", name)
			}
		}
		if !reflect.DeepEqual(c, again) {
			t.Fatalf("the same bytes parsed to two configs:\n%+v\n%+v", c, again)
		}
		if err := c.validate(newLocator(data)); err != nil {
			t.Fatalf("an accepted config fails validation again: %v", err)
		}
	})
}

func TestSecrets(t *testing.T) {
	cfg, err := Parse("s.yaml", []byte(`runtime: {kind: sim, env: {HF_TOKEN: hf_runtime, VLLM_LOGGING_LEVEL: DEBUG}}
gpus: [{name: g, memory: 80GiB}]
models:
  a: {env: {OPENAI_API_KEY: sk-model-a, CUDA_DEVICE_ORDER: PCI_BUS_ID}, extra_args: ["--api-key=sk-arg", "--enforce-eager"]}
`))
	if err != nil {
		t.Fatal(err)
	}
	got := cfg.Secrets(func(k string) string {
		if k == "HF_TOKEN" {
			return "hf_from_vgw_env"
		}
		return ""
	})
	slices.Sort(got)
	want := []string{"hf_from_vgw_env", "hf_runtime", "sk-arg", "sk-model-a"}
	if !slices.Equal(got, want) {
		t.Errorf("Secrets = %v, want %v", got, want)
	}
}
