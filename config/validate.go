package config

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"net"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"
)

// ModelNamePattern is what a model name may look like: the names clients
// send (Hugging Face style "org/name", Ollama style "name:tag"), and no
// more, since a name reaches HTTP headers, logs and container labels.
var ModelNamePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}$`)

// instancePattern is what runtime.instance may be: it starts container
// names, so Docker's rules for those, and short.
var instancePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$`)

// managedFlags are the vLLM flags vgw sets itself; extra_args may not
// override them, or placement would plan with numbers vLLM does not use
// (the Python gateway's lesson 7).
var managedFlags = []string{
	"--model", "--served-model-name", "--gpu-memory-utilization", "--tensor-parallel-size",
	"--pipeline-parallel-size", "--max-model-len", "--max-num-seqs", "--port", "--host",
	"--quantization", "--dtype", "--lora-modules",
}

// flagAliases are vLLM's short names for managed flags.
var flagAliases = map[string]string{"-tp": "--tensor-parallel-size", "-pp": "--pipeline-parallel-size", "-q": "--quantization"}

// managedFlag returns the managed flag that arg names, or "". vLLM's
// parser takes --max_model_len for --max-model-len, and short aliases.
func managedFlag(arg string) string {
	if long, ok := flagAliases[arg]; ok {
		return long
	}
	if name, ok := strings.CutPrefix(arg, "--"); ok {
		arg = "--" + strings.ReplaceAll(name, "_", "-")
	}
	if slices.Contains(managedFlags, arg) {
		return arg
	}
	return ""
}

type validator struct {
	loc      *locator
	problems []Problem
}

func (v *validator) at(path []string, format string, args ...any) {
	v.problems = append(v.problems, Problem{Line: v.loc.line(path...), Message: fmt.Sprintf(format, args...)})
}

// validate checks the values that decoding cannot.
func (c *Config) validate(loc *locator) error {
	v := &validator{loc: loc}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.LogLevel)); err != nil {
		v.at([]string{"log_level"}, "log_level %s is not one of debug, info, warn, error", trimmed(c.LogLevel))
	}
	if c.LogFormat != "json" && c.LogFormat != "text" {
		v.at([]string{"log_format"}, "log_format %s is not json or text", trimmed(c.LogFormat))
	}
	// Slices, not maps, here and below: problems on one line keep this
	// order, and a map's would change from run to run.
	for _, l := range []struct{ key, addr string }{{"extproc", c.Listen.ExtProc}, {"xds", c.Listen.XDS}, {"admin", c.Listen.Admin}, {"http", c.Listen.HTTP}} {
		if _, _, err := net.SplitHostPort(l.addr); err != nil {
			v.at([]string{"listen", l.key}, "listen.%s %s is not host:port", l.key, trimmed(l.addr))
		}
	}
	v.positive("max_concurrent", c.MaxConcurrent, 1)
	v.positive("max_queue", c.MaxQueue, 0)
	v.positive("max_models", c.MaxModels, 0)
	if c.MaxBodyBytes < 1024 || c.MaxBodyBytes > 1<<30 {
		v.at([]string{"max_body_bytes"}, "max_body_bytes must be between 1KiB and 1GiB, got %v", c.MaxBodyBytes)
	}
	if c.MaxAudioBodyBytes < 1024 || c.MaxAudioBodyBytes > 1<<30 {
		v.at([]string{"max_audio_body_bytes"}, "max_audio_body_bytes must be between 1KiB and 1GiB, got %v", c.MaxAudioBodyBytes)
	}
	v.duration([]string{"queue_timeout"}, c.QueueTimeout)
	v.duration([]string{"load_timeout"}, c.LoadTimeout)
	if c.InactivityTimeout < 0 {
		v.at([]string{"inactivity_timeout"}, "inactivity_timeout must not be negative (0 keeps models loaded)")
	}
	v.duration([]string{"shutdown_timeout"}, c.ShutdownTimeout)
	v.duration([]string{"drain_timeout"}, c.DrainTimeout)
	if c.MinResident < 0 {
		v.at([]string{"min_resident"}, "min_resident must not be negative")
	}
	v.probe(nil, c.ProbeInterval, c.ProbeTimeout, c.ProbeFailures)
	v.envoy(c)
	v.runtime(c)
	if len(c.Models) == 0 {
		v.at([]string{"models"}, "no models configured")
	}
	for _, name := range c.ModelNames() {
		v.model(c, name, c.Models[name])
	}
	v.names(c)
	v.requestDefaults(c)
	v.sleep(c)
	v.fairness(c)
	if len(v.problems) > 0 {
		sortProblems(v.problems)
		return &ListError{File: c.Path, Problems: v.problems}
	}
	return nil
}

// probe checks probe settings, gateway-wide (at nil) or a model's as
// they resolve.
func (v *validator) probe(at []string, interval, timeout Duration, failures int) {
	key := func(k string) []string { return append(slices.Clone(at), k) }
	if interval < 0 {
		v.at(key("probe_interval"), "probe_interval must not be negative (0 turns probing off)")
	}
	if interval > 0 && (timeout <= 0 || timeout > interval) {
		v.at(key("probe_timeout"), "probe_timeout must be a positive duration no longer than probe_interval")
	}
	if interval > 0 && failures < 1 {
		v.at(key("probe_failures"), "probe_failures must be at least 1")
	}
}

func (v *validator) positive(key string, n, min int) {
	if n < min {
		v.at([]string{key}, "%s must be at least %d, got %d", key, min, n)
	}
}

func (v *validator) duration(path []string, d Duration) {
	if d <= 0 {
		v.at(path, "%s must be a positive duration such as 30s", strings.Join(path, "."))
	}
}

func (v *validator) envoy(c *Config) {
	e := c.Envoy
	v.duration([]string{"envoy", "message_timeout"}, e.MessageTimeout)
	if e.MessageTimeout.Std() > time.Hour {
		// Envoy's own bound (ext_proc.proto: message_timeout <= 3600s).
		v.at([]string{"envoy", "message_timeout"}, "envoy.message_timeout must be at most 1h, as in Envoy")
	}
	if e.MaxMessageTimeout < 0 || e.MaxMessageTimeout.Std() > time.Hour {
		// Envoy's own bound (ext_proc.proto: max_message_timeout <= 3600s).
		v.at([]string{"envoy", "max_message_timeout"}, "envoy.max_message_timeout must be between 0 and 1h, as in Envoy")
	}
	if e.XDSGrace < 0 || e.HealthCheckInterval < 0 {
		v.at([]string{"envoy"}, "envoy.xds_grace and envoy.health_check_interval must not be negative")
	}
	v.duration([]string{"envoy", "xds_ack_timeout"}, e.XDSAckTimeout)
	if e.MaxMessageTimeout > 0 && e.MaxMessageTimeout.Std() < 2*time.Second {
		v.at([]string{"envoy", "max_message_timeout"}, "envoy.max_message_timeout must be 0 or at least 2s to leave vgw room to answer before Envoy's timer")
	}
	if e.FirstByteBudget < 0 {
		v.at([]string{"envoy", "first_byte_budget"}, "envoy.first_byte_budget must not be negative")
	}
	// The longest vgw holds a request: max_message_timeout, or, when Envoy
	// accepts no override, message_timeout (extproc's waitBudget).
	wait := e.MaxMessageTimeout
	if wait == 0 {
		wait = e.MessageTimeout
	}
	if need := max(wait, e.FirstByteBudget); e.StreamIdleTimeout < 0 || (e.StreamIdleTimeout > 0 && e.StreamIdleTimeout < need) {
		v.at([]string{"envoy", "stream_idle_timeout"}, "envoy.stream_idle_timeout must be 0 (none) or at least the longest vgw holds a request (envoy.max_message_timeout, or message_timeout without it) and envoy.first_byte_budget (%v), as Envoy's must: its timer runs through vgw's wait, then again from vgw's answer to the model's first byte, and cuts the request with 504", need.Std())
	}
}

func (v *validator) runtime(c *Config) {
	r := c.Runtime
	switch r.Kind {
	case "sim":
		if !c.GPUs.Auto && len(c.GPUs.Declared) == 0 {
			v.at([]string{"gpus"}, "the sim runtime needs declared gpus (a list of name and memory)")
		}
	case "docker":
		if r.Image == "" {
			v.at([]string{"runtime", "image"}, "the docker runtime needs runtime.image (the vLLM image)")
		}
		if r.Network == "" {
			v.at([]string{"runtime", "network"}, "the docker runtime needs runtime.network, the Docker network Envoy reaches the models on")
		}
		if !instancePattern.MatchString(r.Instance) {
			v.at([]string{"runtime", "instance"}, "runtime.instance %s must be letters, digits, '.', '_' or '-', starting with a letter or digit (it prefixes container names)", trimmed(r.Instance))
		}
		if r.CacheDir != "" && !filepath.IsAbs(r.CacheDir) {
			v.at([]string{"runtime", "cache_dir"}, "runtime.cache_dir %s must be an absolute path on the Docker host", trimmed(r.CacheDir))
		}
		if r.ShmSize < 0 {
			v.at([]string{"runtime", "shm_size"}, "runtime.shm_size must not be negative")
		}
	default:
		v.at([]string{"runtime", "kind"}, "runtime.kind %s is not docker or sim", trimmed(r.Kind))
	}
	for i, g := range c.GPUs.Declared {
		if g.Memory <= 0 {
			v.at([]string{"gpus", fmt.Sprint(i)}, "gpus[%d] needs memory, such as 80GiB", i)
		}
	}
}

func (v *validator) model(c *Config, name string, m *Model) {
	path := func(keys ...string) []string { return append([]string{"models", name}, keys...) }
	if !validName(name) {
		v.at(path(), "model name %s must be 1-128 of letters, digits and . _ : @ + / -, start with a letter or digit, and not contain ..", trimmed(name))
	}
	if m == nil {
		v.at(path(), "model %s has no settings", trimmed(name))
		return
	}
	if m.Repo == "" && c.Runtime.Kind == "docker" {
		v.at(path(), "model %s needs repo (the Hugging Face repository vLLM loads)", trimmed(name))
	}
	if u := m.GPUMemoryUtilization; u < 0 || u > 1 || math.IsNaN(u) {
		v.at(path("gpu_memory_utilization"), "gpu_memory_utilization must be in (0, 1], got %v", u)
	}
	for _, f := range []struct {
		key string
		n   int
	}{{"max_model_len", m.MaxModelLen}, {"max_num_seqs", m.MaxNumSeqs}, {"tensor_parallel_size", m.TensorParallelSize}} {
		if f.n < 0 {
			v.at(path(f.key), "%s must not be negative", f.key)
		}
	}
	if m.MaxConcurrent != nil && *m.MaxConcurrent < 1 {
		v.at(path("max_concurrent"), "max_concurrent must be at least 1")
	}
	if m.MaxQueue != nil && *m.MaxQueue < 0 {
		v.at(path("max_queue"), "max_queue must not be negative")
	}
	if m.QueueTimeout != nil && *m.QueueTimeout <= 0 {
		v.at(path("queue_timeout"), "queue_timeout must be a positive duration")
	}
	if m.Sim.StartupDelay < 0 || m.Sim.TokensPerSecond < 0 || math.IsNaN(m.Sim.TokensPerSecond) || m.Sim.CrashAfter < 0 || m.Sim.CrashMidStream < 0 || m.Sim.SlowHealth < 0 {
		v.at(path("sim"), "sim settings must not be negative")
	}
	if m.InactivityTimeout != nil && *m.InactivityTimeout < 0 {
		v.at(path("inactivity_timeout"), "inactivity_timeout must not be negative (0 keeps the model loaded)")
	}
	if m.ProbeInterval != nil || m.ProbeTimeout != nil || m.ProbeFailures != nil {
		p := c.ProbeOf(name)
		v.probe(path(), Duration(p.Interval), Duration(p.Timeout), p.Failures)
	}
	tp := max(m.TensorParallelSize, 1)
	if len(m.GPUs) > 0 && len(m.GPUs) != tp {
		v.at(path("gpus"), "gpus pins %d GPUs but tensor_parallel_size is %d", len(m.GPUs), tp)
	}
	for _, g := range m.GPUs {
		if g < 0 || (len(c.GPUs.Declared) > 0 && g >= len(c.GPUs.Declared)) {
			v.at(path("gpus"), "gpu index %d does not exist", g)
		}
	}
	if len(c.GPUs.Declared) > 0 && tp > len(c.GPUs.Declared) {
		v.at(path("tensor_parallel_size"), "tensor_parallel_size %d exceeds the %d declared GPUs", tp, len(c.GPUs.Declared))
	}
	for i, a := range m.ExtraArgs {
		flag, _, _ := strings.Cut(a, "=")
		if managed := managedFlag(flag); managed != "" {
			how := "from the model's settings"
			switch managed {
			case "--served-model-name":
				how = "from the model's key, aliases and repo (use aliases)"
			case "--lora-modules":
				how = "from the model's adapters (use adapters)"
			}
			v.at(path("extra_args", fmt.Sprint(i)), "extra_args may not set %s: vgw manages it %s", managed, how)
		}
	}
}

// locator finds the line of a key path in the parsed YAML, so that a
// semantic error can say where it is. A path that does not exist resolves
// to the line of its deepest existing ancestor.
type locator struct {
	root ast.Node
}

func newLocator(data []byte) *locator {
	f, err := parser.ParseBytes(data, 0)
	if err != nil || len(f.Docs) == 0 {
		return &locator{}
	}
	return &locator{root: f.Docs[0].Body}
}

func (l *locator) line(keys ...string) int {
	node, line := l.root, 0
	for _, k := range keys {
		var next ast.Node
		switch n := node.(type) {
		case *ast.MappingNode:
			for _, mv := range n.Values {
				if keyIs(mv, k) {
					next, line = mv.Value, mv.Key.GetToken().Position.Line
					break
				}
			}
		case *ast.MappingValueNode: // a mapping with a single entry
			if keyIs(n, k) {
				next, line = n.Value, n.Key.GetToken().Position.Line
			}
		case *ast.SequenceNode:
			if i, err := strconv.Atoi(k); err == nil && i >= 0 && i < len(n.Values) {
				next = n.Values[i]
				if tk := next.GetToken(); tk != nil {
					line = tk.Position.Line
				}
			}
		}
		if next == nil {
			break
		}
		node = next
	}
	return line
}

func keyIs(mv *ast.MappingValueNode, k string) bool {
	return strings.Trim(mv.Key.String(), `"'`) == k
}

// requestDefaults checks each model's request defaults as they resolve:
// JSON values, at most 64 keys, and no "model" (which routes: that is
// default_model's). default_model must be a name clients may use.
func (v *validator) requestDefaults(c *Config) {
	if _, ok := c.RequestDefaults["model"]; ok {
		v.at([]string{"request_defaults", "model"}, `request_defaults may not set "model": that is default_model`)
	}
	for _, name := range c.ModelNames() {
		m := c.Models[name]
		if m == nil {
			continue
		}
		if _, ok := m.RequestDefaults["model"]; ok {
			v.at([]string{"models", name, "request_defaults", "model"}, `request_defaults may not set "model": it routes the request`)
		}
		b, err := c.RequestDefaultsOf(name)
		if err != nil {
			v.at([]string{"models", name, "request_defaults"}, "%v", err)
			continue
		}
		var keys map[string]json.RawMessage
		if json.Unmarshal(b, &keys) == nil && len(keys) > 64 {
			v.at([]string{"models", name, "request_defaults"}, "model %s has %d request defaults with the gateway's, more than 64", trimmed(name), len(keys))
		}
	}
	if c.DefaultModel != "" {
		switch n, ok := c.Names()[c.DefaultModel]; {
		case !ok:
			v.at([]string{"default_model"}, "default_model %s is not a name of any configured model", trimmed(c.DefaultModel))
		case n.Kind == NameAdapter:
			// A form with no model goes on as it came, and vLLM would
			// serve it with the base model.
			v.at([]string{"default_model"}, "default_model %s is an adapter: name a model (its key, repo or an alias)", trimmed(c.DefaultModel))
		}
	}
}
