// Package extproc is vgw's Envoy external processor: for every request
// Envoy proxies, it reads the model name, admits, queues or rejects the
// request against that model's limits, and tells Envoy which cluster to
// route it to. It knows the GPU manager and the xDS server only through
// the Leases interface it declares here, and imports nothing else of vgw.
package extproc

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
)

// Leases is what the request path needs of the GPU manager and the xDS
// server together: a hold on a model's server that the request's Envoy
// can route to. The node is the Envoy's node id (MetadataNode), "" when
// the Envoy did not say.
type Leases interface {
	// TryLease leases model for a request of node's Envoy when the model
	// can take it now: it is ready, and that Envoy knows where it runs. It
	// never blocks and runs for every request, so for a resident model it
	// must be cheap and allocate nothing.
	TryLease(node, model string) (Lease, bool)
	// Lease waits for model: it loads it (evicting others) if need be,
	// then waits until node's Envoy knows where it runs. It returns an
	// error when the model cannot be placed or fails to load, or its
	// Envoy cannot route to it (wrapping ErrModelNotFound or
	// ErrNotRoutable where they apply), and ctx's error when ctx ends
	// first.
	Lease(ctx context.Context, node, model string) (Lease, error)
}

// A Lease is a request's hold on its model's server: while any is held,
// the model is neither unloaded for idleness nor stopped before its drain
// timeout. Release gives it back, exactly once, with what became of the
// request.
type Lease interface {
	Release(Result)
}

// ErrModelNotFound is what Leases.Lease wraps when the model is not
// configured (any more): the request is answered 404, not 503.
var ErrModelNotFound = errors.New("model not found")

// ErrNotRoutable is what Leases.Lease wraps when the model is ready but
// the request's Envoy cannot be expected to route to it (it rejected vgw's
// config, or stopped answering it): the request is answered 503 at once,
// not held to its deadline.
var ErrNotRoutable = errors.New("the proxy cannot route to the model")

// MetadataNode is the gRPC metadata key by which an Envoy names itself on
// its ext_proc streams: its node id, set in the bootstrap as
// grpc_service.initial_metadata. It tells whose xDS acknowledgement a
// request must wait for.
const MetadataNode = "x-vgw-node"

// nodeOf returns the Envoy node id of the ext_proc stream ctx belongs to,
// or "" when the Envoy did not say. It is read once per stream.
func nodeOf(ctx context.Context) string {
	if v := metadata.ValueFromIncomingContext(ctx, MetadataNode); len(v) > 0 {
		return v[0]
	}
	return ""
}

// Result is what became of an admitted request.
type Result struct {
	// Status is the upstream HTTP status, or 0 if no response started.
	Status int
	// Duration runs from admission to the end of the response.
	Duration time.Duration
}

// Model is a model clients may name, the Envoy cluster that serves it,
// and its admission limits.
type Model struct {
	// Name is the model's own name: the one vgw reports it under, and
	// the manager knows it by.
	Name string
	// Aliases are the other names that route to the model (its repo and
	// its configured aliases), and Adapters the LoRA adapters its server
	// loads; a request naming any of them is the model's, in its queue.
	// A request naming an alias goes on naming the model itself (its
	// body rewritten), as its server answers to that name alone; one
	// naming an adapter goes on as it came.
	Aliases  []string
	Adapters []string
	// Cluster is the Envoy cluster name, set as the x-vgw-cluster header
	// that the Envoy route's cluster_header reads.
	Cluster string
	Limits  Limits
	// Defaults, when set, is a JSON object of request defaults: keys a
	// JSON request for the model gets when its body lacks them.
	Defaults []byte
	// DefaultFor, when set, makes the model the one a request that names
	// no model goes to (default_model, which names it so): the body gets
	// "model" set to the model's own name. At most one model has it.
	DefaultFor string
}

// Server implements envoy.service.ext_proc.v3.ExternalProcessor.
type Server struct {
	extprocv3.UnimplementedExternalProcessorServer

	leases    Leases
	log       *slog.Logger
	decisions *DecisionLog

	maxBody           int
	maxAudioBody      int
	loadTimeout       time.Duration
	messageTimeout    time.Duration
	maxMessageTimeout time.Duration

	models atomic.Pointer[modelTable]
	flows  atomic.Pointer[flowTable] // see Fairness
	setMu  sync.Mutex                // serialises SetModels and SetFairness, and guards retired and fairness
	// fairness is what flows was made from.
	fairness Fairness
	// retired holds the entries of models removed from the config, and
	// when each was, so that a model added back gets its old gate: the
	// requests it still has in flight count against its max_concurrent,
	// not beside it. An entry a minute retired and idle is dropped by the
	// next SetModels.
	retired  map[string]retiredEntry
	draining atomic.Bool
	unknown  counts // decisions for requests that named no configured model

	waited func(model string, d time.Duration) // see Options.OnWait
	redact func(string) string                 // see Options.Redact
	state  func(model string) string           // see Options.State

	trustModelHeader atomic.Bool // see Options.TrustModelHeader
	started          time.Time   // reported as the models' created time

	streamIdle time.Duration // see Options.StreamIdleTimeout
	idleClosed atomic.Uint64 // streams ended for their silence
	clock      clockwork.Clock
}

// retiredEntry is a removed model's admission state, and when it left.
type retiredEntry struct {
	entry *modelEntry
	at    time.Time
}

// modelTable is an immutable snapshot of the configured models, swapped
// whole on reload so the request path reads it without a lock.
type modelTable struct {
	byName map[string]nameRef     // every name a request may use
	models map[string]*modelEntry // by the model's own name
	listed []listedName           // every name, sorted, for the model list
	// fallback is the model a request that names no model goes to
	// (Model.DefaultFor: its own name), nil when there is none, and fallbackKV the
	// "model" key the request's body gets for it.
	fallback, fallbackKV []byte
}

// nameRef is what a name a request may use stands for: its model, and
// whether the request's body must say the model's own name instead
// before it goes on (an alias or repo: the model's server answers to its
// own name and its adapters only, so that a reload can add an alias
// without restarting it).
type nameRef struct {
	model   *modelEntry
	rewrite bool
}

// listedName is one entry of the model list: a name clients may use,
// the model it routes to, and for an adapter that model's name.
type listedName struct {
	id     string
	model  *modelEntry
	parent string // "" but for an adapter
}

type modelEntry struct {
	name          string
	quoted        []byte                   // name as a JSON string, for bodies rewritten to name it
	defaults      atomic.Pointer[defaults] // nil: none
	gate          *gate
	route         atomic.Pointer[routeHeaders] // replaced when a reload moves the model to another cluster
	queueFullBody []byte                       // the 429 body, rendered once
	counts        counts
}

// counts are a model's decisions so far, for metrics: an atomic add each.
type counts struct {
	outcomes [len(outcomeNames)]atomic.Uint64
	statuses [len(countedStatuses)]atomic.Uint64
}

// countedStatuses are the answers counted by status; other statuses count
// under the last slot.
var countedStatuses = [...]int{400, 404, 413, 429, 503, 504, 0}

func (c *counts) add(o Outcome, status int) {
	if int(o) < len(c.outcomes) {
		c.outcomes[o].Add(1)
	}
	if status == 0 {
		return
	}
	i := len(countedStatuses) - 1
	for j, st := range countedStatuses[:i] {
		if st == status {
			i = j
			break
		}
	}
	c.statuses[i].Add(1)
}

// Counts is what a model's decisions have been so far.
type Counts struct {
	// Outcomes counts decisions by outcome, indexed by Outcome.
	Outcomes map[Outcome]uint64
	// Statuses counts the answers vgw gave itself, by HTTP status (0 for
	// any status not listed in CountedStatuses).
	Statuses map[int]uint64
}

func (c *counts) snapshot() Counts {
	out := Counts{Outcomes: map[Outcome]uint64{}, Statuses: map[int]uint64{}}
	for i := range c.outcomes {
		if n := c.outcomes[i].Load(); n > 0 {
			out.Outcomes[Outcome(i)] = n
		}
	}
	for i, st := range countedStatuses {
		if n := c.statuses[i].Load(); n > 0 {
			out.Statuses[st] = n
		}
	}
	return out
}

func newModelEntry(m Model, t *flowTable) *modelEntry {
	q, _ := json.Marshal(m.Name) // a string: cannot fail
	e := &modelEntry{name: m.Name, quoted: q, gate: newGate(m.Limits, t), queueFullBody: queueFull(m.Name, 0).body()}
	e.setCluster(m.Cluster)
	return e
}

// routeHeaders caches the immutable header mutations for a model's
// cluster, and the whole common admit reply, so admitting a request builds
// nothing. gRPC only reads a message it sends, so streams share them.
type routeHeaders struct {
	cluster    string
	model      *corev3.HeaderValueOption
	clusterHdr *corev3.HeaderValueOption
	bodyReply  *extprocv3.ProcessingResponse // admits at the body phase, queue depth 0
	// headersReply admits at the headers phase (x-vgw-model), queue depth
	// 0, response body mode NONE.
	headersReply *extprocv3.ProcessingResponse
}

// setCluster builds m's route headers for cluster, unless they are built.
func (m *modelEntry) setCluster(cluster string) {
	if h := m.route.Load(); h != nil && h.cluster == cluster {
		return
	}
	h := &routeHeaders{
		cluster:    cluster,
		model:      setHeader(HeaderModel, []byte(m.name)),
		clusterHdr: setHeader(HeaderCluster, []byte(cluster)),
	}
	h.bodyReply = bodyReply(h, 0)
	h.headersReply = headersReply(h, 0, filterv3.ProcessingMode_NONE)
	m.route.Store(h)
}

// Options are a Server's settings. The zero value of each field is its
// default.
type Options struct {
	// Log receives decisions at debug level; slog.Default() when nil.
	Log *slog.Logger
	// Decisions keeps recent decisions; a ring of 4096 when nil.
	Decisions *DecisionLog
	// MaxBody is the largest request body vgw reads; larger ones are 413
	// (DefaultMaxBody when 0). It should not exceed Envoy's buffer limit
	// for the route, or Envoy answers 413 itself before vgw sees the body.
	MaxBody int
	// MaxAudioBody is the same for the audio endpoints
	// (/v1/audio/transcriptions and translations), whose uploads may be
	// larger (DefaultMaxAudioBody when 0). Envoy's buffer limit for their
	// route should be the same.
	MaxAudioBody int
	// LoadTimeout bounds how long a request waits for its model to load
	// (DefaultLoadTimeout when 0).
	LoadTimeout time.Duration
	// MessageTimeout and MaxMessageTimeout are the message_timeout and
	// max_message_timeout of Envoy's ext_proc filter. A request may wait
	// only as long as Envoy lets it (see waitBudget). MessageTimeout is
	// DefaultMessageTimeout when 0; MaxMessageTimeout 0 means Envoy
	// accepts no override, as in Envoy.
	MessageTimeout    time.Duration
	MaxMessageTimeout time.Duration
	// StreamIdleTimeout bounds how long an ext_proc stream may wait for
	// Envoy's next message where Envoy's own idle timer bounds it; a
	// stream silent for longer is ended, and what it held given back
	// (idle.go). Set it above Envoy's stream_idle_timeout, which ends
	// every real request sooner; 0 sets no bound. The bound works only
	// on a listener built with ServerOptions.
	StreamIdleTimeout time.Duration
	// OnWait, when set, is told how long each request that waited (for a
	// slot or for its model) waited, whatever became of it; for a
	// histogram. It runs on the request's goroutine and must be quick.
	OnWait func(model string, d time.Duration)
	// Redact, when set, masks secrets in the cause of a failed load
	// before a client is told it. The manager already keeps the model
	// server's log and the daemon's address out of what clients see
	// (its errors' Public text); this is the second line, for any cause
	// vgw passes on that quotes a value from the config.
	Redact func(string) string
	// Clock times the stream idle bound; tests move a fake one.
	Clock clockwork.Clock
	// TrustModelHeader routes a request that carries x-vgw-model by that
	// header alone, without reading its body (which then streams
	// upstream, with no body limit of vgw's). Only for a deployment
	// where nothing a client sends can set the header: when false (the
	// default), a client's x-vgw-model changes nothing.
	TrustModelHeader bool
	// State, when set, tells a model's state (by its own name) for the
	// model list's vgw_state: "ready", "loading", "stopped" and so on.
	State func(model string) string
	// Fairness is how tenants share each model's queue; the zero value
	// puts every request in one flow at one priority, a FIFO.
	Fairness Fairness
}

// Defaults, matching Envoy's own where the value mirrors an Envoy setting.
const (
	DefaultMaxBody        = 1 << 20                // Envoy's default per-connection buffer limit
	DefaultMaxAudioBody   = 25 << 20               // OpenAI's limit for audio uploads
	DefaultMessageTimeout = 200 * time.Millisecond // ext_proc filter config.h
	DefaultLoadTimeout    = 10 * time.Minute
)

// New returns a server for models, whose requests take leases.
func New(models []Model, leases Leases, o Options) *Server {
	s := &Server{
		leases:            leases,
		log:               cmp.Or(o.Log, slog.Default()),
		decisions:         o.Decisions,
		maxBody:           cmp.Or(o.MaxBody, DefaultMaxBody),
		maxAudioBody:      cmp.Or(o.MaxAudioBody, DefaultMaxAudioBody),
		loadTimeout:       cmp.Or(o.LoadTimeout, DefaultLoadTimeout),
		messageTimeout:    cmp.Or(o.MessageTimeout, DefaultMessageTimeout),
		maxMessageTimeout: o.MaxMessageTimeout,
		streamIdle:        o.StreamIdleTimeout,
		waited:            o.OnWait,
		redact:            o.Redact,
		state:             o.State,
		started:           time.Now(),
		clock:             o.Clock,
	}
	if s.clock == nil {
		s.clock = clockwork.NewRealClock()
	}
	if s.redact == nil {
		s.redact = func(s string) string { return s }
	}
	if s.state == nil {
		s.state = func(string) string { return "" }
	}
	s.trustModelHeader.Store(o.TrustModelHeader)
	s.fairness = o.Fairness
	s.flows.Store(newFlowTable(o.Fairness, nil))
	if s.decisions == nil {
		s.decisions = NewDecisionLog(4096)
	}
	s.SetModels(models)
	return s
}

// Register adds the service to g.
func (s *Server) Register(g *grpc.Server) { extprocv3.RegisterExternalProcessorServer(g, s) }

// Decisions returns the ring of recent decisions.
func (s *Server) Decisions() *DecisionLog { return s.decisions }

// SetModels replaces the configured models. A model that stays keeps its
// queue, in-flight count and statistics, and takes the new limits; a model
// that goes is answered 404 from now on, while its admitted requests finish.
// A model that comes back before they have finished takes up its old
// state again, so they still count against its limits.
func (s *Server) SetModels(models []Model) {
	var refused []slog.Attr
	defer func() {
		if len(refused) > 0 {
			s.log.LogAttrs(context.Background(), slog.LevelError, "request defaults ignored", refused...)
		}
	}()
	s.setMu.Lock()
	defer s.setMu.Unlock()
	// Entries retired a while ago and idle now are dropped: no request
	// can reach them any more, as every stream that read the table they
	// were in has long since taken its slot.
	now := time.Now()
	for name, r := range s.retired {
		if !r.entry.gate.busy() && now.Sub(r.at) > time.Minute {
			delete(s.retired, name)
		}
	}
	var old map[string]*modelEntry
	if t := s.models.Load(); t != nil {
		old = t.models
	}
	t := &modelTable{byName: make(map[string]nameRef, len(models)), models: make(map[string]*modelEntry, len(models))}
	for _, m := range models {
		e, ok := old[m.Name]
		if !ok {
			var r retiredEntry
			r, ok = s.retired[m.Name]
			e = r.entry
			delete(s.retired, m.Name)
		}
		if ok {
			e.gate.setLimits(m.Limits)
			e.setCluster(m.Cluster)
		} else {
			e = newModelEntry(m, s.flows.Load())
		}
		d, err := parseDefaults(m.Defaults)
		if err != nil {
			// The config is checked before it gets here; a model whose
			// defaults cannot be read goes without them, and says so
			// (once the lock is let go).
			refused = append(refused, slog.String(m.Name, err.Error()))
		}
		e.defaults.Store(d)
		t.models[m.Name] = e
		if m.DefaultFor != "" && t.fallback == nil {
			// By the model's own name, which its server answers to.
			t.fallback = []byte(m.Name)
			t.fallbackKV = append(appendKey(nil, "model"), e.quoted...)
		}
	}
	// Each model's own name first: config validation keeps names unique
	// across models, and should two collide anyway, a model's own name
	// wins over another's alias, and the first model (in the order
	// given) over later ones.
	for _, m := range models {
		t.name(m.Name, t.models[m.Name], "", false)
	}
	for _, m := range models {
		e := t.models[m.Name]
		for _, a := range m.Aliases {
			t.name(a, e, "", true)
		}
		for _, a := range m.Adapters {
			t.name(a, e, m.Name, false)
		}
	}
	slices.SortFunc(t.listed, func(a, b listedName) int { return strings.Compare(a.id, b.id) })
	for name, e := range old {
		if _, stays := t.models[name]; !stays {
			if s.retired == nil {
				s.retired = map[string]retiredEntry{}
			}
			s.retired[name] = retiredEntry{e, now}
		}
	}
	s.models.Store(t)
}

// SetFairness puts new fairness settings in force, for requests from now
// on and for those waiting (see gate.setTable). Settings equal to those
// in force change nothing.
func (s *Server) SetFairness(f Fairness) {
	s.setMu.Lock()
	defer s.setMu.Unlock()
	if reflect.DeepEqual(f, s.fairness) {
		return
	}
	t := newFlowTable(f, s.flows.Load())
	s.fairness = f
	s.flows.Store(t)
	for _, e := range s.models.Load().models {
		e.gate.setTable(t)
	}
	for _, r := range s.retired {
		r.entry.gate.setTable(t)
	}
}

// name adds a name that routes to e, unless it is taken.
func (t *modelTable) name(id string, e *modelEntry, parent string, rewrite bool) {
	if _, taken := t.byName[id]; taken {
		return
	}
	t.byName[id] = nameRef{e, rewrite}
	t.listed = append(t.listed, listedName{id: id, model: e, parent: parent})
}

// SetTrustModelHeader turns the x-vgw-model fast path on or off (see
// Options.TrustModelHeader), for requests from now on.
func (s *Server) SetTrustModelHeader(on bool) { s.trustModelHeader.Store(on) }

// SetDraining starts or stops draining. While draining, vgw admits no new
// request: each is answered 503 with Retry-After, so that clients go to
// another replica or come back. Requests already admitted or queued carry
// on. vgw drains when it shuts down; the admin service drains for
// maintenance.
func (s *Server) SetDraining(on bool) { s.draining.Store(on) }

// Draining reports whether vgw is draining.
func (s *Server) Draining() bool { return s.draining.Load() }

// Counts returns every configured model's decision counts, and under ""
// those of requests that named no configured model.
func (s *Server) Counts() map[string]Counts {
	t := s.models.Load()
	out := make(map[string]Counts, len(t.models)+1)
	for name, e := range t.models {
		out[name] = e.counts.snapshot()
	}
	out[""] = s.unknown.snapshot()
	return out
}

// Stats returns the admission state of one model, by its own name.
func (s *Server) Stats(model string) (GateStats, bool) {
	e, ok := s.models.Load().models[model]
	if !ok {
		return GateStats{}, false
	}
	return e.gate.stats(), true
}

// AllStats returns the admission state of every configured model.
func (s *Server) AllStats() map[string]GateStats {
	t := s.models.Load()
	out := make(map[string]GateStats, len(t.models))
	for name, e := range t.models {
		out[name] = e.gate.stats()
	}
	return out
}

// lookup finds the model a request names, by any of its names.
func (t *modelTable) lookup(name []byte) nameRef {
	return t.byName[string(name)] // no allocation: the compiler special-cases this conversion
}

// waitBudget is how long a request may wait in all (for a slot, then for
// its model), and the margin kept before Envoy's own timer would fire.
// Envoy gives a reply message_timeout (200 ms by default) unless vgw
// extends it (once per message) with override_message_timeout, which Envoy
// accepts only up to max_message_timeout
// (source/extensions/filters/http/ext_proc/processor_state.cc,
// ext_proc.cc). vgw therefore answers 504 itself a margin before the longest
// timer it can ask for, so the client gets vgw's answer, not Envoy's.
func (s *Server) waitBudget(queueTimeout time.Duration) (budget, margin time.Duration) {
	limit := s.maxMessageTimeout
	if limit <= 0 {
		limit = s.messageTimeout
	}
	margin = min(time.Second, limit/4)
	return min(queueTimeout+s.loadTimeout, limit-margin), margin
}

// RecvLimit is the largest message the ext_proc listener receives: a body
// of maxBody (the larger of the JSON and audio limits), with room for its framing, or the request headers, which
// travel in a message of their own (Envoy's limit on them is 60 KiB by
// default, max_request_headers_kb). gRPC refuses a longer message on its
// length prefix, before reading it, so no stream holds more than this of
// a body (grpc-go rpc_util.go recvMsg). A body over maxBody that Envoy
// buffered (a chunked one, with no content-length for the headers check)
// still gets vgw's 413 as long as it is under this; Envoy's buffer limit
// should not exceed it (vgw envoy-check --config says so), or such a body
// becomes Envoy's 500.
func RecvLimit(maxBody int) int { return maxBody + 1<<20 }

// MaxStreamsPerConnection caps the ext_proc streams one connection may
// have open, so that one peer cannot hold unbounded state on one
// connection. Each request, waiting ones included, is one stream; Envoy's
// HTTP/2 pool opens another connection when a connection reaches the cap
// vgw advertises (SETTINGS_MAX_CONCURRENT_STREAMS), up to the ext_proc
// cluster's max_connections (envoy/envoy.yaml: 1024).
const MaxStreamsPerConnection = 4096

// ServerOptions are the gRPC server settings s's listener needs: the
// transport's (GRPCOptions) and the stream idle bound.
func (s *Server) ServerOptions() []grpc.ServerOption {
	return append(GRPCOptions(max(s.maxBody, s.maxAudioBody)), s.streamIdleOption())
}

// GRPCOptions are the gRPC server settings an ext_proc listener needs:
// messages up to RecvLimit, at most MaxStreamsPerConnection streams per
// connection, keepalive pings from Envoy accepted without a stream open,
// connections that carry no stream for 5 minutes closed (gracefully: a
// GOAWAY, after which Envoy opens a new one when it needs one) and a
// connection that has not finished its handshake in 10 s dropped.
func GRPCOptions(maxBody int) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(RecvLimit(maxBody)),
		grpc.MaxConcurrentStreams(MaxStreamsPerConnection),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: 5 * time.Minute}),
		grpc.ConnectionTimeout(10 * time.Second),
	}
}
