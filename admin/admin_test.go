package admin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/vgw-project/vgw/admin/admintest"
	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/internal/secrets"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/manager/gpu"
	adminv1 "github.com/vgw-project/vgw/proto/adminv1"
	"github.com/vgw-project/vgw/xds"
)

// fakes stand in for the manager, the request path and the xDS server;
// the whole of vgw is tested in cmd/vgw against the real ones.
type fakeManager struct {
	mu      sync.Mutex
	models  []manager.ModelView
	gpus    []manager.GPUStatus
	loadErr error
	// sleepErr, when set, is what Sleep answers.
	sleepErr error
	pinned   map[string]bool
	calls    int // of Load, Unload and Pin
}

// View publishes a View of the models as they are set now.
func (f *fakeManager) View() *manager.View {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := append([]manager.ModelView(nil), f.models...)
	for i := range out {
		out[i].Pinned = f.pinned[out[i].Name]
	}
	return manager.NewViews().Publish(out, f.gpus)
}
func (f *fakeManager) Load(_ context.Context, name string, _ bool) error {
	if f.loadErr != nil {
		return f.loadErr
	}
	return f.known(name)
}
func (f *fakeManager) Unload(name string) error { return f.known(name) }
func (f *fakeManager) Sleep(_ context.Context, name string, _ bool) error {
	if f.sleepErr != nil {
		return f.sleepErr
	}
	return f.known(name)
}
func (f *fakeManager) Wake(_ context.Context, name string, _ bool) error { return f.known(name) }
func (f *fakeManager) Pin(name string, on bool) error {
	if err := f.known(name); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pinned[name] = on
	return nil
}
func (f *fakeManager) known(name string) error {
	f.mu.Lock()
	f.calls++
	f.mu.Unlock()
	for _, m := range f.models {
		if m.Name == name {
			return nil
		}
	}
	return fmt.Errorf("%w: %s", manager.ErrUnknownModel, name)
}

type fakeAdmission struct {
	mu       sync.Mutex
	counts   map[string]extproc.Counts
	draining bool
}

func (f *fakeAdmission) AllStats() map[string]extproc.GateStats {
	return map[string]extproc.GateStats{"llama": {Limits: extproc.Limits{MaxConcurrent: 8, MaxQueue: 32}, InFlight: 3, Queued: 2,
		Bands: []extproc.BandStats{
			{Priority: 10, Tenants: []extproc.FlowStats{{Tenant: "team-a", Admitted: 4}}},
			{Priority: 0, Queued: 2, Tenants: []extproc.FlowStats{{Tenant: "default-flow", Queued: 2, Admitted: 1, Displaced: 1, Rejected: 3}}},
		}}}
}
func (f *fakeAdmission) Counts() map[string]extproc.Counts {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]extproc.Counts{}
	for k, v := range f.counts {
		c := extproc.Counts{Outcomes: map[extproc.Outcome]uint64{}, Statuses: map[int]uint64{}}
		for o, n := range v.Outcomes {
			c.Outcomes[o] = n
		}
		for s, n := range v.Statuses {
			c.Statuses[s] = n
		}
		out[k] = c
	}
	return out
}

// reject counts n answers of each status for model, at once.
func (f *fakeAdmission) reject(model string, n map[int]uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.counts[model]
	if !ok {
		c = extproc.Counts{Outcomes: map[extproc.Outcome]uint64{}, Statuses: map[int]uint64{}}
		f.counts[model] = c
	}
	for status, k := range n {
		c.Statuses[status] += k
		c.Outcomes[extproc.OutcomeRejected] += k
	}
}
func (f *fakeAdmission) Decisions() *extproc.DecisionLog { return extproc.NewDecisionLog(8) }
func (f *fakeAdmission) SetDraining(on bool)             { f.mu.Lock(); f.draining = on; f.mu.Unlock() }
func (f *fakeAdmission) Draining() bool                  { f.mu.Lock(); defer f.mu.Unlock(); return f.draining }
func (f *fakeAdmission) IdleClosed() uint64              { return 2 }

type fakeEnvoys struct{}

func (fakeEnvoys) Status() ([]xds.NodeStatus, []xds.NACK) {
	n := xds.NACK{Node: "edge-1", TypeURL: "type.googleapis.com/envoy.config.cluster.v3.Cluster", Version: "v7", Error: "bad cluster"}
	return []xds.NodeStatus{{Node: "edge-1", Streams: 2, ClustersVersion: "v8", EndpointsVersion: "v8", LastNACK: &n, Silent: 1, SilentSince: time.Unix(1000, 0)}}, []xds.NACK{n}
}
func (fakeEnvoys) Version() string        { return "v8" }
func (fakeEnvoys) Counters() xds.Counters { return xds.Counters{Pushes: 8, ACKs: 15, NACKs: 1} }

const secret = "hf_do-not-show-me"

func newTestService(t *testing.T) (*Service, *fakeManager, *fakeAdmission) {
	t.Helper()
	cfg, err := config.Parse("vgw.yaml", []byte(`runtime: {kind: sim, env: {HF_TOKEN: `+secret+`}}
gpus: [{name: g, memory: 80GiB}]
models:
  llama: {vram: 20GiB, env: {HF_TOKEN: `+secret+`}}
`))
	if err != nil {
		t.Fatal(err)
	}
	mgr := &fakeManager{
		models: []manager.ModelView{{Name: "llama", State: manager.Ready, GPUs: []int{0}, Addr: "127.0.0.1:8001", Endpoint: "127.0.0.1:8001", PerGPU: 20 << 30, Footprint: "declared"}},
		gpus:   []manager.GPUStatus{{GPU: gpu.GPU{Index: 0, Name: "g", Total: 80 << 30}, Used: 20 << 30}},
		pinned: map[string]bool{},
	}
	adm := &fakeAdmission{counts: map[string]extproc.Counts{}}
	level := new(slog.LevelVar)
	svc := NewService(Options{
		Manager: mgr, Admission: adm, Envoys: fakeEnvoys{}, Level: level,
		Config: func() *config.Config { return cfg },
		Events: NewHub(), Metrics: NewMetrics(), Log: slog.New(slog.DiscardHandler), Version: "test", Started: time.Now(),
	})
	return svc, mgr, adm
}

func TestStatus(t *testing.T) {
	svc, _, _ := newTestService(t)
	st := svc.Status()
	if len(st.Gpus) != 1 || st.Gpus[0].FreeBytes != 60<<30 || st.Gpus[0].UsedBytes != 20<<30 {
		t.Errorf("gpus %v", st.Gpus)
	}
	if len(st.Models) != 1 {
		t.Fatalf("models %v", st.Models)
	}
	m := st.Models[0]
	if m.State != "ready" || m.Cluster != "model/llama" || m.InFlight != 3 || m.QueueDepth != 2 || m.MaxConcurrent != 8 || m.LastUsed != nil {
		t.Errorf("model %v", m)
	}
	if q := m.Queue; len(q) != 2 || q[0].Priority != 10 || q[0].Tenants[0].Tenant != "team-a" || q[0].Tenants[0].Admitted != 4 ||
		q[1].Queued != 2 || q[1].Tenants[0].Displaced != 1 || q[1].Tenants[0].Rejected != 3 {
		t.Errorf("queue %v", m.Queue)
	}
	if e := st.Envoys; len(e) != 1 || e[0].LastNack.GetError() != "bad cluster" || e[0].ClustersVersion != "v8" ||
		e[0].SilentStreams != 1 || e[0].SilentSince.AsTime().Unix() != 1000 {
		t.Errorf("envoys %v", st.Envoys)
	}
	if st.Config.LogLevel != "info" {
		t.Errorf("log level %q", st.Config.LogLevel)
	}
	if strings.Contains(st.String(), secret) {
		t.Errorf("status shows a secret: %v", st)
	}
}

func TestGRPCError(t *testing.T) {
	svc, _, _ := newTestService(t)
	tests := []struct {
		err  error
		code codes.Code
	}{
		{fmt.Errorf("%w: x", manager.ErrUnknownModel), codes.NotFound},
		{fmt.Errorf("waiting: %w", context.DeadlineExceeded), codes.DeadlineExceeded},
		{context.Canceled, codes.Canceled},
		{&manager.NoRoom{Model: "x"}, codes.Unavailable},
		{&manager.LoadError{Model: "x", Err: errors.New("exit 1")}, codes.Unavailable},
		{manager.ErrClosed, codes.Unavailable},
		{fmt.Errorf("model x: %w", manager.ErrUnloaded), codes.Aborted},
		{errors.New("odd"), codes.Internal},
	}
	for _, tt := range tests {
		if got := status.Code(svc.grpcError(tt.err)); got != tt.code {
			t.Errorf("%v: %v, want %v", tt.err, got, tt.code)
		}
	}
	if svc.grpcError(nil) != nil {
		t.Error("nil error mapped to an error")
	}
}

func TestReadToken(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		content, want string
		fails         bool
	}{
		{content: "s3cret\n", want: "s3cret"},
		{content: "  s3cret  \nsecond line\n", want: "s3cret"},
		{content: "\n", fails: true},
		{content: "", fails: true},
	}
	for i, tt := range tests {
		p := filepath.Join(dir, fmt.Sprint(i))
		os.WriteFile(p, []byte(tt.content), 0o600)
		got, err := ReadToken(p)
		if (err != nil) != tt.fails || got != tt.want {
			t.Errorf("%q: %q, %v", tt.content, got, err)
		}
	}
	if _, err := ReadToken(filepath.Join(dir, "missing")); err == nil {
		t.Error("a missing file gave a token")
	}
}

// TestTokenAuth serves the admin service with a token over real gRPC: every
// Admin RPC needs it, health does not, and a refusal never echoes what
// was sent.
func TestTokenAuth(t *testing.T) {
	svc, _, _ := newTestService(t)
	const token = "right-token"
	srv := grpc.NewServer(TokenAuth(token)...)
	adminv1.RegisterAdminServer(srv, svc)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	client := adminv1.NewAdminClient(conn)

	tests := []struct {
		name   string
		header []string
		code   codes.Code
	}{
		{"none", nil, codes.Unauthenticated},
		{"wrong", []string{"authorization", "Bearer wrong-token"}, codes.Unauthenticated},
		{"prefix of the right one", []string{"authorization", "Bearer right"}, codes.Unauthenticated},
		{"no Bearer", []string{"authorization", token}, codes.Unauthenticated},
		{"Basic", []string{"authorization", "Basic " + token}, codes.Unauthenticated},
		{"right", []string{"authorization", "Bearer " + token}, codes.OK},
		{"right, scheme in lower case", []string{"authorization", "bearer " + token}, codes.OK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := metadata.AppendToOutgoingContext(context.Background(), tt.header...)
			_, err := client.GetStatus(ctx, &adminv1.GetStatusRequest{})
			if status.Code(err) != tt.code {
				t.Fatalf("GetStatus: %v, want %v", err, tt.code)
			}
			if err != nil && strings.Contains(err.Error(), "wrong-token") {
				t.Errorf("the refusal echoes the token sent: %v", err)
			}
			// The stream RPC is guarded too; its first event says it is live.
			sctx, cancel := context.WithCancel(ctx)
			defer cancel()
			stream, err := client.WatchEvents(sctx, &adminv1.WatchEventsRequest{})
			var e *adminv1.Event
			if err == nil {
				e, err = stream.Recv()
			}
			if status.Code(err) != tt.code || tt.code == codes.OK && e.GetKind() != "watching" {
				t.Errorf("WatchEvents: %v %v, want %v", e, err, tt.code)
			}
		})
	}
	if _, err := healthpb.NewHealthClient(conn).Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Errorf("health needs no token, got %v", err)
	}

	// Every method of the service, however it is called, needs the token:
	// an empty message is a valid request for each of them.
	desc := adminv1.Admin_ServiceDesc
	for _, m := range desc.Methods {
		err := conn.Invoke(context.Background(), "/"+desc.ServiceName+"/"+m.MethodName, &emptypb.Empty{}, &emptypb.Empty{})
		if status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s without a token: %v", m.MethodName, err)
		}
	}
	for _, sd := range desc.Streams {
		stream, err := conn.NewStream(context.Background(), &sd, "/"+desc.ServiceName+"/"+sd.StreamName)
		if err == nil {
			if err = stream.SendMsg(&emptypb.Empty{}); err == nil {
				stream.CloseSend()
				err = stream.RecvMsg(&emptypb.Empty{})
			}
		}
		if status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s without a token: %v", sd.StreamName, err)
		}
	}
}

func TestActions(t *testing.T) {
	svc, mgr, adm := newTestService(t)
	ctx := context.Background()
	if _, err := svc.PinModel(ctx, &adminv1.PinModelRequest{Model: "llama"}); err != nil {
		t.Fatal(err)
	}
	if r, _ := svc.ListModels(ctx, nil); !r.Models[0].Pinned {
		t.Error("not pinned after PinModel")
	}
	if r, err := svc.UnpinModel(ctx, &adminv1.UnpinModelRequest{Model: "llama"}); err != nil || r.Model.Pinned {
		t.Errorf("UnpinModel: %v %v", r, err)
	}
	if _, err := svc.PinModel(ctx, &adminv1.PinModelRequest{Model: "nope"}); status.Code(err) != codes.NotFound {
		t.Errorf("pin of an unknown model: %v", err)
	}
	mgr.loadErr = &manager.NoRoom{Model: "llama"}
	if _, err := svc.LoadModel(ctx, &adminv1.LoadModelRequest{Model: "llama"}); status.Code(err) != codes.Unavailable {
		t.Errorf("load with no room: %v", err)
	}

	r, err := svc.SetLogLevel(ctx, &adminv1.SetLogLevelRequest{Level: "debug"})
	if err != nil || r.Previous != "info" || r.Level != "debug" || svc.d.Level.Level() != slog.LevelDebug {
		t.Errorf("SetLogLevel: %v %v", r, err)
	}
	if svc.Status().Config.LogLevel != "debug" {
		t.Error("status does not show the new level")
	}
	if _, err := svc.SetLogLevel(ctx, &adminv1.SetLogLevelRequest{Level: "loud"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("bad level: %v", err)
	}
	if _, err := svc.ListDecisions(ctx, &adminv1.ListDecisionsRequest{Outcome: "maybe"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("bad outcome: %v", err)
	}

	if _, err := svc.LoadModel(ctx, &adminv1.LoadModelRequest{Model: "llama", Wait: true, Timeout: durationpb.New(-time.Second)}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("a negative timeout: %v", err)
	}

	d, err := svc.Drain(ctx, &adminv1.DrainRequest{Drain: true})
	if err != nil || !d.Draining || d.InFlight != 3 || !adm.Draining() {
		t.Errorf("Drain: %v %v", d, err)
	}
	if d, _ := svc.Drain(ctx, &adminv1.DrainRequest{}); d.Draining || adm.Draining() {
		t.Error("still draining after drain=false")
	}
	// Shutting down, vgw drains until it stops: no operator undoes that.
	svc.d.Stopping = func() bool { return true }
	adm.SetDraining(true)
	if _, err := svc.Drain(ctx, &adminv1.DrainRequest{}); status.Code(err) != codes.FailedPrecondition || !adm.Draining() {
		t.Errorf("drain=false while stopping: %v, draining %v", err, adm.Draining())
	}
}

// TestHostileModelArg: a model name no config could hold is refused
// before anything repeats it, and what the refusal quotes of it is short
// and valid UTF-8. A 3 MB name came back whole in the NotFound error.
func TestHostileModelArg(t *testing.T) {
	svc, mgr, _ := newTestService(t)
	ctx := context.Background()
	for name, model := range map[string]string{
		"3 MB":      strings.Repeat("a", 3<<20),
		"129 bytes": strings.Repeat("b", 129),
		"not UTF-8": "ll\xffama",
		"newline":   "llama\nINFO forged log line",
	} {
		calls := []func() error{
			func() error { _, err := svc.LoadModel(ctx, &adminv1.LoadModelRequest{Model: model}); return err },
			func() error { _, err := svc.UnloadModel(ctx, &adminv1.UnloadModelRequest{Model: model}); return err },
			func() error { _, err := svc.PinModel(ctx, &adminv1.PinModelRequest{Model: model}); return err },
			func() error { _, err := svc.UnpinModel(ctx, &adminv1.UnpinModelRequest{Model: model}); return err },
		}
		for i, call := range calls {
			err := call()
			st := status.Convert(err)
			if st.Code() != codes.InvalidArgument || len(st.Message()) > 256 || !utf8.ValidString(st.Message()) || strings.Contains(st.Message(), "\n") {
				t.Errorf("%s, call %d: %v %d bytes %q…", name, i, st.Code(), len(st.Message()), st.Message()[:min(80, len(st.Message()))])
			}
		}
	}
	if mgr.calls != 0 {
		t.Errorf("the manager was asked %d times about names it cannot have", mgr.calls)
	}
	huge := strings.Repeat("x", 3<<20)
	for what, call := range map[string]func() error{
		"SetLogLevel": func() error { _, err := svc.SetLogLevel(ctx, &adminv1.SetLogLevelRequest{Level: huge}); return err },
		"ListDecisions": func() error {
			_, err := svc.ListDecisions(ctx, &adminv1.ListDecisionsRequest{Outcome: huge})
			return err
		},
	} {
		if st := status.Convert(call()); st.Code() != codes.InvalidArgument || len(st.Message()) > 256 {
			t.Errorf("%s with a 3 MB argument: %v, %d bytes", what, st.Code(), len(st.Message()))
		}
	}
}

// TestSecretsMasked: what the service shows of text it did not write (a
// failed load's server log, an event's detail) goes through Redact.
func TestSecretsMasked(t *testing.T) {
	svc, mgr, _ := newTestService(t)
	var r secrets.Redactor
	r.Set([]string{secret})
	svc.d.Redact = r.Redact
	leak := &manager.LoadError{Model: "llama", Err: errors.New("exit 1"), LogTail: "args: --api-key " + secret}
	mgr.models[0].LastError = leak.Error()
	mgr.loadErr = leak
	_, err := svc.LoadModel(context.Background(), &adminv1.LoadModelRequest{Model: "llama"})
	st := svc.Status()
	for what, text := range map[string]string{"error": fmt.Sprint(err), "last_error": st.Models[0].LastError} {
		if strings.Contains(text, secret) || !strings.Contains(text, secrets.Mask) {
			t.Errorf("%s not masked: %s", what, text)
		}
	}
}

func TestHub(t *testing.T) {
	h := NewHub()
	all, stopAll := h.Watch("")
	llama, stopLlama := h.Watch("llama")
	h.Publish(Event{Kind: "ready", Model: "qwen"})
	h.Publish(Event{Kind: "ready", Model: "llama"})
	h.Publish(Event{Kind: "xds_nack"}) // about no model: for every watcher
	for _, want := range []string{"qwen", "llama", ""} {
		if e := <-all; e.Model != want {
			t.Errorf("all: %v, want model %q", e, want)
		}
	}
	for _, want := range []string{"llama", ""} {
		if e := <-llama; e.Model != want {
			t.Errorf("llama watcher: %v, want model %q", e, want)
		}
	}
	if len(llama) != 0 || len(all) != 0 {
		t.Error("more events than published")
	}
	stopAll()
	stopLlama()
	h.Publish(Event{Kind: "ready", Model: "llama"})
	if len(llama) != 0 || len(all) != 0 {
		t.Error("events after stop")
	}
}

// TestHubSlowWatcher: a watcher that does not read loses events without
// holding up Publish, and is told how many it lost.
func TestHubSlowWatcher(t *testing.T) {
	h := NewHub()
	slow, stop := h.Watch("")
	defer stop()
	const sent = watcherBuffer + 50
	for i := range sent {
		h.Publish(Event{Kind: "ready", Model: fmt.Sprint(i)})
	}
	// Reading now frees room; the next event brings the count of those lost.
	for i := range watcherBuffer {
		if e := <-slow; e.Model != fmt.Sprint(i) {
			t.Fatalf("event %d: %v", i, e)
		}
	}
	h.Publish(Event{Kind: "ready", Model: "last"})
	if e := <-slow; e.Kind != "dropped" || !strings.HasPrefix(e.Detail, "50 events were dropped") {
		t.Errorf("no dropped notice: %v", e)
	}
	if e := <-slow; e.Model != "last" {
		t.Errorf("after the notice: %v", e)
	}
}

// TestPublishRejections: a burst of errors in a period becomes one event
// per model that names the statuses; a quiet period publishes nothing.
func TestPublishRejections(t *testing.T) {
	svc, _, adm := newTestService(t)
	events, stop := svc.d.Events.Watch("")
	defer stop()
	before := adm.Counts()
	adm.reject("llama", map[int]uint64{429: 12, 503: 1})
	adm.reject("", map[int]uint64{404: 2})
	after := adm.Counts()
	svc.publishRejections(before, after, time.Second)
	svc.publishRejections(after, after, time.Second)
	got := map[string]string{}
	for len(events) > 0 {
		e := <-events
		if e.Kind != "rejected" {
			t.Errorf("kind %q", e.Kind)
		}
		if _, dup := got[e.Model]; dup {
			t.Errorf("a second event for %q: %+v", e.Model, e)
		}
		got[e.Model] = e.Detail
	}
	want := map[string]string{
		"llama": "12 answered 429, 1 answered 503 in the last 1s",
		"":      "2 answered 404 in the last 1s, for requests that named no configured model",
	}
	if !maps.Equal(got, want) {
		t.Errorf("events %v, want %v", got, want)
	}
}

func TestBurst(t *testing.T) {
	tests := []struct {
		before, after map[int]uint64
		want          string
	}{
		{nil, map[int]uint64{429: 3}, "3 answered 429"},
		{map[int]uint64{429: 3}, map[int]uint64{429: 3}, ""},
		{map[int]uint64{429: 3, 503: 1}, map[int]uint64{429: 5, 503: 1, 0: 2}, "2 answered another status, 2 answered 429"},
		// The model was removed and added back: its counts began again.
		{map[int]uint64{429: 10}, map[int]uint64{429: 4}, "4 answered 429"},
	}
	for _, tt := range tests {
		if got := burst(tt.before, tt.after); got != tt.want {
			t.Errorf("burst(%v, %v) = %q, want %q", tt.before, tt.after, got, tt.want)
		}
	}
}

func TestHTTP(t *testing.T) {
	svc, _, adm := newTestService(t)
	m := svc.d.Metrics
	m.Models([]string{"llama"})
	m.Event("llama", manager.EventReady, 1500*time.Millisecond)
	adm.reject("", map[int]uint64{404: 2})
	adm.reject("llama", map[int]uint64{0: 1})
	adm.counts["llama"].Outcomes[extproc.OutcomeAdmitted] = 5
	adm.counts["llama"].Outcomes[extproc.OutcomeQueued] = 4
	m.QueueWait("llama", 40*time.Millisecond)
	var notReady atomic.Pointer[error]
	starting := errors.New("starting")
	notReady.Store(&starting)
	srv := httptest.NewServer(Handler(svc, m, HTTPOptions{Token: "tok", Ready: func() error { return *notReady.Load() }}))
	defer srv.Close()

	get := func(path, token string) (int, string) {
		t.Helper()
		code, body, err := admintest.Get(srv.URL+path, token)
		if err != nil {
			t.Fatal(err)
		}
		return code, string(body)
	}
	tests := []struct {
		path, token string
		code        int
		body        string
	}{
		{"/healthz", "", 200, "ok"},
		{"/readyz", "", 503, "not ready: starting"},
		{"/status", "", 401, "Bearer"},
		{"/status", "wrong", 401, ""},
		{"/status", "tok", 200, `"logLevel"`},
	}
	for _, tt := range tests {
		code, body := get(tt.path, tt.token)
		if code != tt.code || !strings.Contains(body, tt.body) {
			t.Errorf("%s (token %q): %d %q", tt.path, tt.token, code, body)
		}
		if strings.Contains(body, secret) {
			t.Errorf("%s shows a secret", tt.path)
		}
	}
	_, body := get("/status", "tok")
	var page adminv1.Status
	if err := protojson.Unmarshal([]byte(body), &page); err != nil || page.GetConfig().GetLogLevel() != "info" || page.GetModels()[0].GetName() != "llama" {
		t.Errorf("/status: %v\n%s", err, body)
	}
	var none error
	notReady.Store(&none)
	if code, _ := get("/readyz", ""); code != 200 {
		t.Errorf("/readyz once ready: %d", code)
	}

	_, body = get("/metrics", "")
	got, err := admintest.Parse(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics: %v", err)
	}
	want := map[string]float64{
		`vgw_gpu_info{gpu="0",name="g",uuid=""}`:                                           1,
		`vgw_gpu_memory_used_bytes{gpu="0"}`:                                               20 << 30,
		`vgw_gpu_memory_total_bytes{gpu="0"}`:                                              80 << 30,
		`vgw_requests_in_flight{model="llama"}`:                                            3,
		`vgw_model_max_concurrent{model="llama"}`:                                          8,
		`vgw_decisions_total{model="llama",outcome="admitted"}`:                            5,
		`vgw_decisions_total{model="_unknown",outcome="rejected"}`:                         2,
		`vgw_queued_total{model="llama"}`:                                                  4,
		`vgw_answers_total{model="_unknown",status="404"}`:                                 2,
		`vgw_answers_total{model="llama",status="other"}`:                                  1,
		`vgw_xds_connected_envoys`:                                                         1,
		`vgw_draining`:                                                                     0,
		`vgw_queue_depth{model="llama"}`:                                                   2,
		`vgw_band_queue_depth{model="llama",priority="0"}`:                                 2,
		`vgw_band_queue_depth{model="llama",priority="10"}`:                                0,
		`vgw_band_requests_total{model="llama",priority="10",result="admitted"}`:           4,
		`vgw_band_requests_total{model="llama",priority="0",result="displaced"}`:           1,
		`vgw_tenant_queue_depth{model="llama",tenant="default-flow"}`:                      2,
		`vgw_tenant_requests_total{model="llama",result="admitted",tenant="team-a"}`:       4,
		`vgw_tenant_requests_total{model="llama",result="rejected",tenant="default-flow"}`: 3,
		`vgw_xds_pushes_total`:                                                             8,
		`vgw_xds_acks_total`:                                                               15,
		`vgw_xds_nacks_total`:                                                              1,
		`vgw_xds_silent_streams`:                                                           1,
		`vgw_extproc_idle_streams_ended_total`:                                             2,
		`vgw_model_events_total{kind="unhealthy",model="llama"}`:                           0,
		`vgw_model_events_total{kind="crashed",model="llama"}`:                             0,
		`vgw_model_events_total{kind="ready",model="llama"}`:                               1,
		`vgw_model_state{model="llama",state="ready"}`:                                     1,
		`vgw_model_load_seconds_count{model="llama"}`:                                      1,
		`vgw_queue_wait_seconds_count{model="llama"}`:                                      1,
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
		}
	}
	for k := range got {
		if strings.Contains(k, `outcome="queued"`) {
			t.Errorf("%s: a wait is not how a request ended", k)
		}
	}

	// A model gone from the config loses its series.
	m.Models([]string{"qwen"})
	_, body = get("/metrics", "")
	if got, err = admintest.Parse(strings.NewReader(body)); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{`vgw_model_events_total{kind="crashed",model="llama"}`, `vgw_model_load_seconds_count{model="llama"}`, `vgw_queue_wait_seconds_count{model="llama"}`} {
		if _, ok := got[k]; ok {
			t.Errorf("%s after llama left the config", k)
		}
	}
	if _, ok := got[`vgw_model_events_total{kind="crashed",model="qwen"}`]; !ok {
		t.Error("no series for qwen, newly configured")
	}
}
