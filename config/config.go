// Package config reads vgw's YAML configuration: gateway-wide limits and
// listeners, the runtime that runs models, the GPUs, and the models clients
// may ask for. Unknown keys and wrong types are errors, and every error
// names the file and line it comes from.
package config

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"

	"github.com/vgw-project/vgw/internal/secrets"
)

// Config is one vgw configuration file.
type Config struct {
	Listen    Listen `yaml:"listen"`
	LogLevel  string `yaml:"log_level"`  // debug, info, warn or error
	LogFormat string `yaml:"log_format"` // json or text

	// Gateway-wide defaults; each model may override the admission ones.
	MaxConcurrent     int      `yaml:"max_concurrent"`
	MaxQueue          int      `yaml:"max_queue"`
	QueueTimeout      Duration `yaml:"queue_timeout"`
	LoadTimeout       Duration `yaml:"load_timeout"`
	InactivityTimeout Duration `yaml:"inactivity_timeout"`
	MaxModels         int      `yaml:"max_models"`   // awake at once (sleepers not counted); 0 = no limit
	MinResident       Duration `yaml:"min_resident"` // no eviction before this, but as a last resort
	MaxBodyBytes      Bytes    `yaml:"max_body_bytes"`
	// MaxAudioBodyBytes is the body limit of the audio endpoints
	// (/v1/audio/transcriptions and translations), whose uploads are
	// larger than JSON: OpenAI's 25 MiB by default.
	MaxAudioBodyBytes Bytes    `yaml:"max_audio_body_bytes"`
	ShutdownTimeout   Duration `yaml:"shutdown_timeout"`
	// DrainTimeout bounds how long unloading a model waits for its
	// requests in flight to finish.
	DrainTimeout Duration `yaml:"drain_timeout"`
	// FootprintsFile keeps the GPU memory each model was measured to use,
	// so placement knows it after a restart; empty keeps it in memory.
	FootprintsFile string `yaml:"footprints_file"`
	// A ready model's server is probed (GET /health) every ProbeInterval,
	// each probe failing after ProbeTimeout; after ProbeFailures failures
	// in a row it is taken out of service and restarted. A ProbeInterval
	// of 0 turns probing off.
	ProbeInterval Duration `yaml:"probe_interval"`
	ProbeTimeout  Duration `yaml:"probe_timeout"`
	ProbeFailures int      `yaml:"probe_failures"`
	// TrustModelHeader routes a request that carries x-vgw-model by that
	// header alone, without reading its body: faster, but whoever can set
	// the header chooses the route and skips vgw's body limit. Only for a
	// front where no client can set it; off, a client's header changes
	// nothing (and envoy/envoy.yaml strips it before ext_proc).
	TrustModelHeader bool `yaml:"trust_model_header"`
	// RequestDefaults are top-level keys every JSON request gets when its
	// body lacks them (the client's keys win); a model's own are merged
	// over these. DefaultModel, when set, is the name a request that
	// names no model goes by.
	RequestDefaults map[string]any `yaml:"request_defaults"`
	DefaultModel    string         `yaml:"default_model"`
	// Sleep is how models leave their GPUs by default (see Sleep), and
	// HostMemory the host memory that sleeping models may hold in all.
	Sleep      Sleep      `yaml:"sleep"`
	HostMemory HostMemory `yaml:"host_memory"`
	// Fair queues (see fairness.go): where a request's tenant and
	// objective come from, the priority of each objective, the tenants
	// configured, how many of one tenant's requests may wait for a model,
	// and how a model's queue picks the next tenant.
	TenantHeader      string             `yaml:"tenant_header"`
	ObjectiveHeader   string             `yaml:"objective_header"`
	Objectives        map[string]int     `yaml:"objectives"`
	Tenants           map[string]*Tenant `yaml:"tenants"`
	MaxQueuePerTenant int                `yaml:"max_queue_per_tenant"`
	Fairness          string             `yaml:"fairness"`

	Envoy   Envoy             `yaml:"envoy"`
	Runtime Runtime           `yaml:"runtime"`
	GPUs    GPUs              `yaml:"gpus"`
	Models  map[string]*Model `yaml:"models"`

	// Path is the file the config was read from.
	Path string `yaml:"-"`
}

// Listen holds the listener addresses.
type Listen struct {
	ExtProc string `yaml:"extproc"`
	XDS     string `yaml:"xds"`
	Admin   string `yaml:"admin"`
	HTTP    string `yaml:"http"`
}

// Envoy mirrors the settings of Envoy's ext_proc filter that vgw must
// respect; keep them equal to envoy/envoy.yaml.
type Envoy struct {
	// MessageTimeout is the filter's message_timeout.
	MessageTimeout Duration `yaml:"message_timeout"`
	// MaxMessageTimeout is the filter's max_message_timeout: the longest a
	// request can wait in vgw. 0 means Envoy allows no override.
	MaxMessageTimeout Duration `yaml:"max_message_timeout"`
	// XDSGrace bounds how long a request for a model that just loaded
	// waits for its Envoy to connect to xDS when it is not connected; then
	// the request is sent anyway.
	XDSGrace Duration `yaml:"xds_grace"`
	// XDSAckTimeout is how long an Envoy may leave an xDS version
	// unanswered before requests stop waiting for it: those of other
	// Envoys go on, its own are answered 503 at once.
	XDSAckTimeout Duration `yaml:"xds_ack_timeout"`
	// HealthCheckInterval turns on Envoy's active /health checks of model
	// servers; 0 leaves them off (vgw checks /health before it routes).
	HealthCheckInterval Duration `yaml:"health_check_interval"`
	// StreamIdleTimeout is the connection manager's stream_idle_timeout:
	// the longest a request goes with nothing moving through Envoy's
	// filters before Envoy ends it, so the longest a real Envoy leaves an
	// ext_proc stream silent before the response begins. vgw ends a stream
	// silent for a minute longer (extproc.Options.StreamIdleTimeout); 0 sets
	// no bound. Envoy restarts its timer when request data passes a filter
	// and when the response's headers and data do (filter_manager.cc
	// decodeData, encodeHeaders, encodeData), so after a request's last
	// byte it runs through vgw's wait (at most MaxMessageTimeout, or
	// MessageTimeout without it), and again from vgw's answer, which lets
	// the body go on to the model, through the model's time to its first
	// byte (at most FirstByteBudget): it must cover each. A request with
	// no body (one that names its model in x-vgw-model) has no such
	// restart: one stretch covers both. When it runs out Envoy answers 504
	// (408 while the body is still arriving: utility.cc
	// maybeRequestTimeoutCode).
	StreamIdleTimeout Duration `yaml:"stream_idle_timeout"`
	// FirstByteBudget is the longest a model may take to begin its answer
	// once a request reaches it: for a streamed answer the first token,
	// for a non-streamed one the whole generation. It is a promise vgw
	// checks stream_idle_timeout against, not a timer vgw runs.
	FirstByteBudget Duration `yaml:"first_byte_budget"`
}

// Runtime says how models are run.
type Runtime struct {
	Kind string `yaml:"kind"` // docker or sim
	// Image is the vLLM image (docker); vgw never pulls it.
	Image string `yaml:"image"`
	// Network is the Docker network the containers join, which Envoy and
	// vgw must be on too: a container is reached at its address there.
	Network string `yaml:"network"`
	// CacheDir is the host's Hugging Face cache, mounted into every
	// container (docker).
	CacheDir string            `yaml:"cache_dir"`
	Env      map[string]string `yaml:"env"`
	// Instance names this vgw on its Docker host: its containers are named
	// INSTANCE-MODEL and labelled with it, and it adopts, stops and removes
	// only those, so that two vgws (or vgw and its tests) can share a host.
	Instance string `yaml:"instance"`
	// ShmSize, when set, gives each container a /dev/shm of this size
	// instead of sharing the host's IPC namespace (vLLM's workers talk
	// through shared memory).
	ShmSize Bytes `yaml:"shm_size"`
	// Fakevllm is the command the sim runtime runs for each model; empty
	// runs this vgw binary's own "vgw fakevllm".
	Fakevllm []string `yaml:"fakevllm"`
}

// GPUs is either auto (read from NVML) or a declared list, for sim.
type GPUs struct {
	Auto     bool
	Declared []GPU
}

// GPU is a declared GPU.
type GPU struct {
	Name   string `yaml:"name"`
	Memory Bytes  `yaml:"memory"`
}

// Model is one model clients may name. Pointer fields are unset when nil
// and then take the gateway-wide value.
type Model struct {
	Repo                 string            `yaml:"repo"`
	GPUMemoryUtilization float64           `yaml:"gpu_memory_utilization"`
	MaxModelLen          int               `yaml:"max_model_len"`
	MaxNumSeqs           int               `yaml:"max_num_seqs"`
	TensorParallelSize   int               `yaml:"tensor_parallel_size"`
	Quantization         string            `yaml:"quantization"`
	DType                string            `yaml:"dtype"`
	VRAM                 Bytes             `yaml:"vram"` // declared footprint; learned when 0
	AlwaysOn             bool              `yaml:"always_on"`
	InactivityTimeout    *Duration         `yaml:"inactivity_timeout"`
	MaxConcurrent        *int              `yaml:"max_concurrent"`
	MaxQueue             *int              `yaml:"max_queue"`
	QueueTimeout         *Duration         `yaml:"queue_timeout"`
	ProbeInterval        *Duration         `yaml:"probe_interval"`
	ProbeTimeout         *Duration         `yaml:"probe_timeout"`
	ProbeFailures        *int              `yaml:"probe_failures"`
	GPUs                 []int             `yaml:"gpus"` // pinned GPU indexes
	ExtraArgs            []string          `yaml:"extra_args"`
	Env                  map[string]string `yaml:"env"`
	// Aliases are further names clients may send for the model (besides
	// its key and its repo), such as the OpenAI name an application was
	// written for.
	Aliases []string `yaml:"aliases"`
	// RequestDefaults are the model's request defaults, merged over the
	// gateway-wide ones (see Config.RequestDefaults).
	RequestDefaults map[string]any `yaml:"request_defaults"`
	// Adapters are the LoRA adapters the model's server loads, by the
	// name clients send for each, with where it comes from (a path in
	// the server's file system, or a Hugging Face repo).
	Adapters map[string]string `yaml:"adapters"`
	// Sleep overrides the gateway's sleep setting for this model.
	Sleep Sleep `yaml:"sleep"`
	// Sim is how the sim runtime's fake server for this model behaves.
	Sim Sim `yaml:"sim"`
}

// Sim shapes a model's fake server under the sim runtime.
type Sim struct {
	StartupDelay    Duration `yaml:"startup_delay"`
	TokensPerSecond float64  `yaml:"tokens_per_second"`
	FailStart       bool     `yaml:"fail_start"`
	CrashAfter      int      `yaml:"crash_after"`
	CrashMidStream  int      `yaml:"crash_mid_stream"`
	SlowHealth      Duration `yaml:"slow_health"`
	// SleepDelay and WakeDelay are how long the fake takes to fall asleep
	// and to wake (see FallAsleep and Wake), and ResidualVRAM the GPU
	// memory it keeps on each GPU while asleep (see Residual).
	SleepDelay   *Duration `yaml:"sleep_delay"`
	WakeDelay    *Duration `yaml:"wake_delay"`
	ResidualVRAM *Bytes    `yaml:"residual_vram"`
}

// Defaults. The admission ones are the Python gateway's (50 in flight,
// 200 waiting per model); the Envoy ones match envoy/envoy.yaml.
var Defaults = Config{
	Listen: Listen{
		ExtProc: "127.0.0.1:9002",
		XDS:     "127.0.0.1:18000",
		Admin:   "127.0.0.1:9090",
		HTTP:    "127.0.0.1:9091",
	},
	LogLevel:          "info",
	LogFormat:         "json",
	MaxConcurrent:     50,
	MaxQueue:          200,
	QueueTimeout:      Duration(30 * time.Second),
	LoadTimeout:       Duration(10 * time.Minute),
	InactivityTimeout: Duration(30 * time.Minute),
	MinResident:       Duration(90 * time.Second),
	MaxBodyBytes:      8 << 20,
	MaxAudioBodyBytes: 25 << 20,
	ShutdownTimeout:   Duration(30 * time.Second),
	DrainTimeout:      Duration(30 * time.Second),
	ProbeInterval:     Duration(10 * time.Second),
	ProbeTimeout:      Duration(5 * time.Second),
	ProbeFailures:     3,
	Sleep:             SleepOff,
	HostMemory:        HostMemory{Auto: true},
	TenantHeader:      DefaultTenantHeader,
	ObjectiveHeader:   DefaultObjectiveHeader,
	Fairness:          FairRoundRobin,
	Envoy: Envoy{
		MessageTimeout:    Duration(200 * time.Millisecond),
		MaxMessageTimeout: Duration(900 * time.Second),
		XDSGrace:          Duration(2 * time.Second),
		XDSAckTimeout:     Duration(30 * time.Second),
		StreamIdleTimeout: Duration(960 * time.Second),
		FirstByteBudget:   Duration(600 * time.Second),
	},
	Runtime: Runtime{Kind: "docker", Network: "vgw", Instance: "vgw"},
}

// Load reads and validates the config file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(path, data)
}

// Parse decodes and validates a config. path only labels errors.
func Parse(path string, data []byte) (_ *Config, err error) {
	// go-yaml dereferences nil on some malformed input (a tagged scalar
	// where a list belongs; unknownKeys reports the plain case, not the
	// same reached through an alias), and no config file, least of all one
	// edited under a running vgw that reloads it, may crash vgw.
	defer func() {
		if r := recover(); r != nil {
			err = &ListError{File: path, Problems: []Problem{{Message: fmt.Sprintf("the YAML parser failed on this file: %v", r)}}}
		}
	}()
	// The syntax tree, read once, for the checks before decoding and for
	// the lines of validation's problems; nil when data does not parse (the
	// decoder then says why) or holds no document.
	f, perr := parser.ParseBytes(data, 0)
	var top ast.Node
	if perr == nil && len(f.Docs) > 0 {
		top = f.Docs[0].Body
	}
	if len(bytes.TrimSpace(data)) == 0 || perr == nil && top == nil {
		return nil, &ListError{File: path, Problems: []Problem{{Message: "the file is empty (or holds only comments)"}}}
	}
	// A tag with nothing under it (--- !x) would decode as no config at
	// all, every default gone, and fail fifteen ways; say the one.
	if tn, ok := top.(*ast.TagNode); ok && (tn.Value == nil || tn.Value.Type() == ast.NullType) {
		return nil, &ListError{File: path, Problems: []Problem{{Line: tn.GetToken().Position.Line, Message: "tag was used where mapping is expected"}}}
	}
	c := Defaults
	c.Runtime.Env = nil
	if ps := unknownKeys(top); len(ps) > 0 {
		return nil, &ListError{File: path, Problems: ps}
	}
	if err := yaml.UnmarshalWithOptions(data, &c, yaml.DisallowUnknownField()); err != nil {
		return nil, decodeError(path, err)
	}
	c.Path = path
	if err := c.validate(&locator{root: top}); err != nil {
		var le *ListError
		if errors.As(err, &le) {
			le.File = path
		}
		return nil, err
	}
	return &c, nil
}

// decodeError turns a go-yaml error into file:line: message.
func decodeError(path string, err error) error {
	var ye yaml.Error
	if errors.As(err, &ye) && ye.GetToken() != nil {
		return &ListError{File: path, Problems: []Problem{{Line: ye.GetToken().Position.Line, Message: ye.GetMessage()}}}
	}
	return &ListError{File: path, Problems: []Problem{{Message: err.Error()}}}
}

// unknownKeys returns a problem for every key under top that names no field
// of the struct it decodes into, in file order. go-yaml's
// DisallowUnknownField alone is not enough: it names one of several unknown
// keys at random (it ranges over a map), so the same file failed with a
// different error from run to run, and a mapping with a key that is not a
// string (1: x) it drops whole and without a word, so that every setting
// beside that key fell back to its default. What the walk cannot type
// (aliases, merge keys) it leaves to the decoder.
func unknownKeys(top ast.Node) []Problem {
	if top == nil {
		return nil // the decoder reports the syntax error
	}
	var ps []Problem
	walkKeys(top, reflect.TypeFor[Config](), &ps)
	return ps
}

// GPUs decodes a list as []GPU, with unknown fields disallowed too.
var gpusType, gpuListType = reflect.TypeFor[GPUs](), reflect.TypeFor[[]GPU]()

func walkKeys(n ast.Node, t reflect.Type, ps *[]Problem) {
	var tag *ast.TagNode
	for {
		if tn, ok := n.(*ast.TagNode); ok {
			n, tag = tn.Value, tn
		} else if an, ok := n.(*ast.AnchorNode); ok {
			n = an.Value
		} else {
			break
		}
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == gpusType {
		t = gpuListType
	} else if _, custom := reflect.PointerTo(t).MethodByName("UnmarshalYAML"); custom {
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		mn, ok := n.(ast.MapNode)
		if !ok {
			return
		}
		fields, ok := yamlFields(t)
		if !ok {
			return
		}
		for it := mn.MapRange(); it.Next(); {
			if it.Key().IsMergeKey() {
				continue
			}
			var k ast.Node = it.Key()
			if mk, ok := k.(*ast.MappingKeyNode); ok { // ? key
				k = mk.Value
			}
			if k == nil || k.GetToken() == nil {
				continue
			}
			s, isString := k.(*ast.StringNode)
			name := k.GetToken().Value
			if isString {
				name = s.Value
			}
			ft, known := fields[name]
			if !known || !isString {
				*ps = append(*ps, Problem{Line: k.GetToken().Position.Line, Message: fmt.Sprintf("unknown field %q", name)})
				continue
			}
			walkKeys(it.Value(), ft, ps)
		}
	case reflect.Map:
		if mn, ok := n.(ast.MapNode); ok {
			for it := mn.MapRange(); it.Next(); {
				if !it.Key().IsMergeKey() {
					walkKeys(it.Value(), t.Elem(), ps)
				}
			}
		}
	case reflect.Slice:
		sn, ok := n.(*ast.SequenceNode)
		if !ok && tag != nil {
			// go-yaml dereferences nil on this one.
			*ps = append(*ps, Problem{Line: tag.GetToken().Position.Line, Message: "tag was used where sequence is expected"})
			return
		}
		if ok {
			for _, v := range sn.Values {
				walkKeys(v, t.Elem(), ps)
			}
		}
	}
}

// yamlFields maps the keys a struct decodes from to its fields' types, by
// go-yaml's rules: the yaml tag's name, else the lowercased field name. It
// returns false for a struct with an inline field, left to the decoder.
func yamlFields(t reflect.Type) (map[string]reflect.Type, bool) {
	fields := map[string]reflect.Type{}
	for f := range t.Fields() {
		tag := f.Tag.Get("yaml")
		if !f.IsExported() || tag == "-" {
			continue
		}
		name, opts, _ := strings.Cut(tag, ",")
		if strings.Contains(opts, "inline") {
			return nil, false
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		fields[name] = f.Type
	}
	return fields, true
}

// A Problem is one thing wrong with a config, at a line (0 if unknown).
type Problem struct {
	Line    int
	Message string
}

// ListError is every problem found in one file.
type ListError struct {
	File     string
	Problems []Problem
}

func (e *ListError) Error() string {
	var b strings.Builder
	for i, p := range e.Problems {
		if i > 0 {
			b.WriteByte('\n')
		}
		if p.Line > 0 {
			fmt.Fprintf(&b, "%s:%d: %s", e.File, p.Line, p.Message)
		} else {
			fmt.Fprintf(&b, "%s: %s", e.File, p.Message)
		}
	}
	return b.String()
}

// ModelNames returns the configured model names, sorted.
func (c *Config) ModelNames() []string {
	names := make([]string, 0, len(c.Models))
	for n := range c.Models {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Limits are a model's admission limits, resolved against the defaults.
type Limits struct {
	MaxConcurrent int
	MaxQueue      int
	QueueTimeout  time.Duration
}

// LimitsOf resolves a model's admission limits: its own setting, else the
// gateway-wide one.
func (c *Config) LimitsOf(name string) Limits {
	m := c.Models[name]
	return Limits{
		MaxConcurrent: deref(m.MaxConcurrent, c.MaxConcurrent),
		MaxQueue:      deref(m.MaxQueue, c.MaxQueue),
		QueueTimeout:  deref(m.QueueTimeout, c.QueueTimeout).Std(),
	}
}

func deref[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

// RequestDefaultsOf resolves a model's request defaults as JSON: the
// gateway-wide ones with the model's over them; nil when there are none.
func (c *Config) RequestDefaultsOf(name string) ([]byte, error) {
	merged := maps.Clone(c.RequestDefaults)
	if m := c.Models[name]; m != nil && len(m.RequestDefaults) > 0 {
		if merged == nil {
			merged = map[string]any{}
		}
		maps.Copy(merged, m.RequestDefaults)
	}
	if len(merged) == 0 {
		return nil, nil
	}
	b, err := json.Marshal(merged)
	if err != nil {
		return nil, fmt.Errorf("request_defaults of model %s: %w", trimmed(name), err)
	}
	return b, nil
}

// Probe is how a ready model's server is watched (see Config.ProbeInterval).
type Probe struct {
	Interval time.Duration // 0: not probed
	Timeout  time.Duration
	Failures int // in a row, before the server is taken out of service
}

// ProbeOf resolves a model's probe settings; a model no longer configured
// (still serving its last requests) has the gateway-wide ones.
func (c *Config) ProbeOf(name string) Probe {
	m := c.Models[name]
	if m == nil {
		m = &Model{}
	}
	return Probe{
		Interval: deref(m.ProbeInterval, c.ProbeInterval).Std(),
		Timeout:  deref(m.ProbeTimeout, c.ProbeTimeout).Std(),
		Failures: deref(m.ProbeFailures, c.ProbeFailures),
	}
}

// InactivityOf resolves a model's inactivity timeout; 0 keeps it loaded.
func (c *Config) InactivityOf(name string) time.Duration {
	return deref(c.Models[name].InactivityTimeout, c.InactivityTimeout).Std()
}

// SlogLevel returns the configured log level.
func (c *Config) SlogLevel() slog.Level {
	var l slog.Level
	_ = l.UnmarshalText([]byte(c.LogLevel)) // validated already
	return l
}

// ApplyEnv overrides listener addresses from the environment
// (VGW_EXTPROC_ADDR, VGW_XDS_ADDR, VGW_ADMIN_ADDR, VGW_HTTP_ADDR).
func (c *Config) ApplyEnv(getenv func(string) string) {
	for env, dst := range map[string]*string{
		"VGW_EXTPROC_ADDR": &c.Listen.ExtProc,
		"VGW_XDS_ADDR":     &c.Listen.XDS,
		"VGW_ADMIN_ADDR":   &c.Listen.Admin,
		"VGW_HTTP_ADDR":    &c.Listen.HTTP,
	} {
		if v := getenv(env); v != "" {
			*dst = v
		}
	}
}

// sortProblems orders problems by line for stable output.
func sortProblems(ps []Problem) {
	slices.SortStableFunc(ps, func(a, b Problem) int { return cmp.Compare(a.Line, b.Line) })
}

// trimmed is a short, printable rendering of a user string for messages.
func trimmed(s string) string {
	const max = 80
	if len(s) > max {
		s = s[:max] + "…"
	}
	return fmt.Sprintf("%q", s)
}

// Secrets returns the credentials the config holds or hands on, which
// vgw must never show: the values of credential-named env entries (the
// runtime's and each model's, and HF_TOKEN in vgw's own environment, which
// the Docker runtime passes to vLLM) and of credential flags in
// extra_args (--api-key).
func (c *Config) Secrets(getenv func(string) string) []string {
	out := secrets.InEnv(c.Runtime.Env)
	for _, name := range []string{"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} {
		if v := getenv(name); v != "" {
			out = append(out, v)
		}
	}
	for _, m := range c.Models {
		out = append(out, secrets.InEnv(m.Env)...)
		out = append(out, secrets.InArgs(m.ExtraArgs)...)
	}
	return out
}
