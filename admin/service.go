package admin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/manager"
	adminv1 "github.com/vgw-project/vgw/proto/adminv1"
	"github.com/vgw-project/vgw/xds"
)

// Manager is the GPU manager as the admin service needs it: its View of
// the models and GPUs, and the operator's actions.
type Manager interface {
	View() *manager.View
	Load(ctx context.Context, name string, wait bool) error
	Unload(name string) error
	Pin(name string, on bool) error
	Sleep(ctx context.Context, name string, wait bool) error
	Wake(ctx context.Context, name string, wait bool) error
}

// Admission is the request path as the admin service needs it.
type Admission interface {
	AllStats() map[string]extproc.GateStats
	Counts() map[string]extproc.Counts
	Decisions() *extproc.DecisionLog
	SetDraining(on bool)
	Draining() bool
	// IdleClosed counts the ext_proc streams ended for their silence.
	IdleClosed() uint64
}

// Envoys is the xDS server as the admin service needs it.
type Envoys interface {
	Status() ([]xds.NodeStatus, []xds.NACK)
	Version() string
	Counters() xds.Counters
}

// Options are what the admin service reports on and acts on, and how.
type Options struct {
	Manager   Manager
	Admission Admission
	Envoys    Envoys
	// Level is the live log level, which SetLogLevel changes.
	Level *slog.LevelVar
	// Config returns the config in force.
	Config func() *config.Config
	Events *Hub
	// Metrics, when set, read the service at every scrape (see
	// NewMetrics). Metrics serve one Service.
	Metrics *Metrics
	Log     *slog.Logger
	Version string
	Started time.Time
	// Redact masks secrets in text vgw did not write itself (a model
	// server's log tail, an Envoy's error) before the service shows it.
	Redact func(string) string
	// Stopping reports that vgw is shutting down: Drain may not undo that.
	Stopping func() bool
}

// Service implements vgw.admin.v1.Admin.
type Service struct {
	adminv1.UnimplementedAdminServer
	d Options
}

// NewService returns the admin service over d.
func NewService(d Options) *Service {
	if d.Redact == nil {
		d.Redact = func(s string) string { return s }
	}
	if d.Stopping == nil {
		d.Stopping = func() bool { return false }
	}
	s := &Service{d: d}
	if d.Metrics != nil {
		d.Metrics.Registry.MustRegister(&collector{svc: s})
	}
	return s
}

// Status is what GetStatus and /status report.
func (s *Service) Status() *adminv1.Status {
	v := s.d.Manager.View()
	nodes, _ := s.d.Envoys.Status()
	st := &adminv1.Status{
		Version:    s.d.Version,
		Started:    timestamppb.New(s.d.Started),
		Draining:   s.d.Admission.Draining(),
		Models:     s.models(v),
		Config:     s.config(),
		XdsVersion: s.d.Envoys.Version(),

		HostMemoryUsedBytes: v.HostUsed, HostMemoryBudgetBytes: v.HostBudget,
	}
	for _, g := range v.GPUs {
		st.Gpus = append(st.Gpus, &adminv1.GPU{
			Index: int32(g.Index), Name: g.Name, Uuid: g.UUID,
			TotalBytes: g.Total, UsedBytes: g.Used, FreeBytes: g.Total - min(g.Used, g.Total),
		})
	}
	for _, n := range nodes {
		en := &adminv1.EnvoyNode{Node: n.Node, Streams: int32(n.Streams), ClustersVersion: n.ClustersVersion, EndpointsVersion: n.EndpointsVersion}
		if n.LastNACK != nil {
			en.LastNack = s.nack(*n.LastNACK)
		}
		if n.Silent > 0 {
			en.SilentStreams, en.SilentSince = int32(n.Silent), timestamppb.New(n.SilentSince)
		}
		st.Envoys = append(st.Envoys, en)
	}
	return st
}

func (s *Service) nack(n xds.NACK) *adminv1.NACK {
	return &adminv1.NACK{Time: timestamppb.New(n.Time), Node: n.Node, TypeUrl: n.TypeURL, Version: n.Version, Error: s.d.Redact(n.Error)}
}

// models renders every model in v, the manager's View, with the
// admission state and limits of the request path.
func (s *Service) models(v *manager.View) []*adminv1.Model {
	gates := s.d.Admission.AllStats()
	var out []*adminv1.Model
	for i := range v.Models {
		out = append(out, s.model(&v.Models[i], gates[v.Models[i].Name]))
	}
	return out
}

func (s *Service) model(m *manager.ModelView, g extproc.GateStats) *adminv1.Model {
	pm := &adminv1.Model{
		Name: m.Name, State: m.State.String(), Instance: m.Instance, Endpoint: m.Addr,
		FootprintBytes: m.PerGPU, FootprintSource: m.Footprint,
		InFlight: int64(g.InFlight), QueueDepth: int32(g.Queued),
		MaxConcurrent: int32(g.Limits.MaxConcurrent), MaxQueue: int32(g.Limits.MaxQueue), QueueTimeout: durationpb.New(g.Limits.QueueTimeout),
		AlwaysOn: m.AlwaysOn, Pinned: m.Pinned, LastError: s.d.Redact(m.LastError), Cluster: xds.ClusterName(m.Name),
		WaitingForLoad: int32(m.Waiting),
		SleepLevel:     int32(m.SleepLevel), ResidualBytes: m.Residual, HostMemoryBytes: m.HostMemory,
	}
	if !m.Removed {
		pm.Sleep = string(s.d.Config().SleepOf(m.Name))
	}
	if !m.Began.IsZero() {
		pm.Began, pm.Phase = timestamppb.New(m.Began), m.Phase
		if m.Percent >= 0 {
			pm.PhasePercent = proto.Int32(int32(m.Percent))
		}
		if m.Expected > 0 {
			pm.ExpectedLeft = durationpb.New(max(time.Until(m.Began.Add(m.Expected)), 0))
		}
	}
	for _, g := range m.GPUs {
		pm.Gpus = append(pm.Gpus, int32(g))
	}
	pm.Queue = queueBands(g.Bands)
	if t := m.LastUsed(); !t.IsZero() {
		pm.LastUsed = timestamppb.New(t)
	}
	if !m.Since.IsZero() {
		pm.Since = timestamppb.New(m.Since)
	}
	if m.RetryAt.After(time.Now()) {
		pm.RetryAt = timestamppb.New(m.RetryAt)
	}
	return pm
}

// queueBands renders a model's queue by priority.
func queueBands(bands []extproc.BandStats) []*adminv1.QueueBand {
	out := make([]*adminv1.QueueBand, 0, len(bands))
	for _, b := range bands {
		qb := &adminv1.QueueBand{Priority: int32(b.Priority), Queued: int32(b.Queued)}
		for _, f := range b.Tenants {
			qb.Tenants = append(qb.Tenants, &adminv1.TenantQueue{Tenant: f.Tenant, Queued: int32(f.Queued),
				Admitted: f.Admitted, Displaced: f.Displaced, Rejected: f.Rejected})
		}
		out = append(out, qb)
	}
	return out
}

// config renders the config in force. It leaves out every env map: they
// carry secrets (HF_TOKEN and the like).
func (s *Service) config() *adminv1.Config {
	c := s.d.Config()
	pc := &adminv1.Config{
		Path: c.Path, LogLevel: strings.ToLower(s.d.Level.Level().String()),
		Runtime: c.Runtime.Kind, Image: c.Runtime.Image,
		MaxConcurrent: int32(c.MaxConcurrent), MaxQueue: int32(c.MaxQueue),
		QueueTimeout: durationpb.New(c.QueueTimeout.Std()), LoadTimeout: durationpb.New(c.LoadTimeout.Std()),
		InactivityTimeout: durationpb.New(c.InactivityTimeout.Std()), MaxModels: int32(c.MaxModels),
		MinResident: durationpb.New(c.MinResident.Std()), MaxBodyBytes: uint64(c.MaxBodyBytes),
		DrainTimeout: durationpb.New(c.DrainTimeout.Std()), MaxMessageTimeout: durationpb.New(c.Envoy.MaxMessageTimeout.Std()),
		Listen: map[string]string{"extproc": c.Listen.ExtProc, "xds": c.Listen.XDS, "admin": c.Listen.Admin, "http": c.Listen.HTTP},
		Sleep:  string(c.Sleep), HostMemory: c.HostMemory.String(),
		TenantHeader: c.TenantHeader, ObjectiveHeader: c.ObjectiveHeader, MaxQueuePerTenant: int32(c.MaxQueuePerTenant),
		Fairness: c.Fairness,
	}
	if len(c.Objectives) > 0 {
		pc.Objectives = map[string]int32{}
		for name, p := range c.Objectives {
			pc.Objectives[name] = int32(p)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(c.Tenants)) {
		t := c.Tenants[name]
		pt := &adminv1.TenantConfig{Name: name, Weight: int32(t.FairWeight()), MaxQueue: int32(c.TenantMaxQueue(name))}
		if t != nil {
			pt.Rpm, pt.Tpm = int32(t.RPM), int32(t.TPM)
		}
		pc.Tenants = append(pc.Tenants, pt)
	}
	return pc
}

func (s *Service) GetStatus(context.Context, *adminv1.GetStatusRequest) (*adminv1.Status, error) {
	return s.Status(), nil
}

func (s *Service) ListModels(context.Context, *adminv1.ListModelsRequest) (*adminv1.ListModelsResponse, error) {
	return &adminv1.ListModelsResponse{Models: s.models(s.d.Manager.View())}, nil
}

// one reports one model, after an action on it.
func (s *Service) one(name string) (*adminv1.Model, error) {
	if m := s.d.Manager.View().Model(name); m != nil {
		return s.model(m, s.d.Admission.AllStats()[name]), nil
	}
	return nil, status.Errorf(codes.NotFound, "model %q is not configured", name)
}

// grpcError maps the manager's errors to gRPC codes an operator can act
// on, with secrets masked: a failed load's error carries its server's log.
func (s *Service) grpcError(err error) error {
	if err == nil {
		return nil
	}
	var nr *manager.NoRoom
	var le *manager.LoadError
	msg := s.d.Redact(err.Error())
	switch {
	case errors.Is(err, manager.ErrUnknownModel):
		return status.Error(codes.NotFound, msg)
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "the model is not ready yet: "+msg)
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, msg)
	case errors.Is(err, manager.ErrClosed), errors.As(err, &nr), errors.As(err, &le):
		return status.Error(codes.Unavailable, msg)
	case errors.Is(err, manager.ErrCannotSleep), errors.Is(err, manager.ErrNotAsleep):
		return status.Error(codes.FailedPrecondition, msg)
	case errors.Is(err, manager.ErrUnloaded):
		// Another action (an unload, a reload without the model) ended
		// the load this call waited for.
		return status.Error(codes.Aborted, msg)
	}
	return status.Error(codes.Internal, msg)
}

func (s *Service) LoadModel(ctx context.Context, req *adminv1.LoadModelRequest) (*adminv1.LoadModelResponse, error) {
	ctx, cancel, err := s.waitContext(ctx, req.GetWait(), req.GetTimeout())
	if err != nil {
		return nil, err
	}
	defer cancel()
	m, err := s.act(ctx, "load", req.GetModel(), func() error { return s.d.Manager.Load(ctx, req.GetModel(), req.GetWait()) })
	return &adminv1.LoadModelResponse{Model: m}, err
}

func (s *Service) SleepModel(ctx context.Context, req *adminv1.SleepModelRequest) (*adminv1.SleepModelResponse, error) {
	ctx, cancel, err := s.waitContext(ctx, req.GetWait(), req.GetTimeout())
	if err != nil {
		return nil, err
	}
	defer cancel()
	m, err := s.act(ctx, "sleep", req.GetModel(), func() error { return s.d.Manager.Sleep(ctx, req.GetModel(), req.GetWait()) })
	return &adminv1.SleepModelResponse{Model: m}, err
}

func (s *Service) WakeModel(ctx context.Context, req *adminv1.WakeModelRequest) (*adminv1.WakeModelResponse, error) {
	ctx, cancel, err := s.waitContext(ctx, req.GetWait(), req.GetTimeout())
	if err != nil {
		return nil, err
	}
	defer cancel()
	m, err := s.act(ctx, "wake", req.GetModel(), func() error { return s.d.Manager.Wake(ctx, req.GetModel(), req.GetWait()) })
	return &adminv1.WakeModelResponse{Model: m}, err
}

// waitContext bounds an action that waits: by timeout, else load_timeout.
func (s *Service) waitContext(ctx context.Context, wait bool, timeout *durationpb.Duration) (context.Context, context.CancelFunc, error) {
	if !wait {
		return ctx, func() {}, nil
	}
	limit := s.d.Config().LoadTimeout.Std()
	if timeout != nil {
		if err := timeout.CheckValid(); err != nil || timeout.AsDuration() <= 0 {
			return nil, nil, status.Errorf(codes.InvalidArgument, "timeout %v: want a duration above zero, such as \"300s\"", timeout.AsDuration())
		}
		limit = timeout.AsDuration()
	}
	ctx, cancel := context.WithTimeout(ctx, limit)
	return ctx, cancel, nil
}

func (s *Service) UnloadModel(ctx context.Context, req *adminv1.UnloadModelRequest) (*adminv1.UnloadModelResponse, error) {
	m, err := s.act(ctx, "unload", req.GetModel(), func() error { return s.d.Manager.Unload(req.GetModel()) })
	return &adminv1.UnloadModelResponse{Model: m}, err
}

func (s *Service) PinModel(ctx context.Context, req *adminv1.PinModelRequest) (*adminv1.PinModelResponse, error) {
	m, err := s.act(ctx, "pin", req.GetModel(), func() error { return s.d.Manager.Pin(req.GetModel(), true) })
	return &adminv1.PinModelResponse{Model: m}, err
}

func (s *Service) UnpinModel(ctx context.Context, req *adminv1.UnpinModelRequest) (*adminv1.UnpinModelResponse, error) {
	m, err := s.act(ctx, "unpin", req.GetModel(), func() error { return s.d.Manager.Pin(req.GetModel(), false) })
	return &adminv1.UnpinModelResponse{Model: m}, err
}

// act carries out an operator's action on model: do, then the audit line,
// then the model as it now stands. A refused action is neither audited nor
// answered with a model.
func (s *Service) act(ctx context.Context, verb, model string, do func() error) (*adminv1.Model, error) {
	if err := checkModelArg(model); err != nil {
		return nil, err
	}
	if err := do(); err != nil {
		return nil, s.grpcError(err)
	}
	s.audit(ctx, verb, model)
	return s.one(model)
}

func (s *Service) SetLogLevel(ctx context.Context, req *adminv1.SetLogLevelRequest) (*adminv1.SetLogLevelResponse, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(req.GetLevel())); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "level %s is not one of debug, info, warn, error", quoted(req.GetLevel()))
	}
	prev := s.d.Level.Level()
	// Logged before the change: a level of warn would hide it after.
	s.audit(ctx, "set_log_level", strings.ToLower(l.String()))
	s.d.Level.Set(l)
	return &adminv1.SetLogLevelResponse{Previous: strings.ToLower(prev.String()), Level: strings.ToLower(l.String())}, nil
}

func (s *Service) ListDecisions(_ context.Context, req *adminv1.ListDecisionsRequest) (*adminv1.ListDecisionsResponse, error) {
	f := extproc.Filter{Model: req.GetModel(), Tenant: req.GetTenant(), Limit: int(req.GetLimit())}
	if f.Limit <= 0 {
		f.Limit = 100
	}
	if o := req.GetOutcome(); o != "" {
		out, ok := extproc.ParseOutcome(o)
		if !ok {
			return nil, status.Errorf(codes.InvalidArgument, "outcome %s is not one of admitted, queued, rejected, timed_out, abandoned", quoted(o))
		}
		f.Outcome = out
	}
	resp := &adminv1.ListDecisionsResponse{}
	for _, d := range s.d.Admission.Decisions().Recent(f) {
		resp.Decisions = append(resp.Decisions, &adminv1.Decision{
			Time: timestamppb.New(d.Time), Model: d.Model, Outcome: d.Outcome.String(), Reason: d.Reason.String(),
			Status: int32(d.Status), QueueDepth: int32(d.QueueDepth), Wait: durationpb.New(d.Wait),
			Tenant: d.Tenant, Priority: int32(d.Priority),
		})
	}
	return resp, nil
}

// WatchEvents first sends a "watching" event, so that the operator (and a
// script) knows the watch is live before anything happens, then every
// event as it comes.
func (s *Service) WatchEvents(req *adminv1.WatchEventsRequest, stream adminv1.Admin_WatchEventsServer) error {
	if m := req.GetModel(); m != "" {
		if err := checkModelArg(m); err != nil {
			return err
		}
	}
	events, stop := s.d.Events.Watch(req.GetModel())
	defer stop()
	what := "all models"
	if m := req.GetModel(); m != "" {
		what = "model " + m
	}
	if err := stream.Send(&adminv1.Event{Time: timestamppb.Now(), Kind: "watching", Model: req.GetModel(), Detail: "events for " + what + " follow"}); err != nil {
		return err
	}
	for {
		select {
		case e := <-events:
			if err := stream.Send(&adminv1.Event{Time: timestamppb.New(e.Time), Kind: e.Kind, Model: e.Model, Detail: s.d.Redact(e.Detail)}); err != nil {
				return err
			}
		case <-stream.Context().Done():
			// The watch ends only when its caller leaves (or vgw stops).
			return status.FromContextError(stream.Context().Err()).Err()
		}
	}
}

func (s *Service) Drain(ctx context.Context, req *adminv1.DrainRequest) (*adminv1.DrainResponse, error) {
	if !req.GetDrain() && s.d.Stopping() {
		return nil, status.Error(codes.FailedPrecondition, "vgw is shutting down: it drains until it stops")
	}
	s.d.Admission.SetDraining(req.GetDrain())
	s.audit(ctx, "drain", fmt.Sprint(req.GetDrain()))
	var inflight int64
	for _, g := range s.d.Admission.AllStats() {
		inflight += int64(g.InFlight)
	}
	return &adminv1.DrainResponse{Draining: s.d.Admission.Draining(), InFlight: inflight}, nil
}

// audit logs an operator's action and where it came from: who changed
// what is the first question on call.
func (s *Service) audit(ctx context.Context, action, target string) {
	attrs := []slog.Attr{slog.String("action", action), slog.String("target", target)}
	if p, ok := peer.FromContext(ctx); ok {
		attrs = append(attrs, slog.String("peer", p.Addr.String()))
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
			attrs = append(attrs, slog.String("client_cert", ti.State.PeerCertificates[0].Subject.String()))
		}
	}
	s.d.Log.LogAttrs(ctx, slog.LevelInfo, "admin action", attrs...)
}

// WatchRejections publishes a "rejected" event once every period for each
// model whose requests vgw answered with errors in that period, until ctx
// ends: a burst of 429s or 503s is what an operator watching events wants
// to see, one line a second, not one per request.
func (s *Service) WatchRejections(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	prev := s.d.Admission.Counts()
	for {
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
		cur := s.d.Admission.Counts()
		s.publishRejections(prev, cur, every)
		prev = cur
	}
}

// publishRejections publishes the bursts between two counts a period apart.
func (s *Service) publishRejections(prev, cur map[string]extproc.Counts, period time.Duration) {
	for model, c := range cur {
		if detail := burst(prev[model].Statuses, c.Statuses); detail != "" {
			detail += " in the last " + period.String()
			if model == "" {
				detail += ", for requests that named no configured model"
			}
			s.d.Events.Publish(Event{Time: time.Now(), Kind: "rejected", Model: model, Detail: detail})
		}
	}
}

// burst says how many answers of each status were added between two
// counts ("12 answered 429, 1 answered 503"), or "" for none. A count that
// went down (the model was removed and added back) counts from zero.
func burst(before, after map[int]uint64) string {
	statuses := make([]int, 0, len(after))
	for st := range after {
		statuses = append(statuses, st)
	}
	sort.Ints(statuses)
	var parts []string
	for _, st := range statuses {
		n, p := after[st], before[st]
		if p > n {
			p = 0
		}
		if n > p {
			what := strconv.Itoa(st)
			if st == 0 {
				what = "another status"
			}
			parts = append(parts, fmt.Sprintf("%d answered %s", n-p, what))
		}
	}
	return strings.Join(parts, ", ")
}

// checkModelArg refuses a model name no config could hold, before anything
// repeats it: errors and events would otherwise carry whatever a caller
// sent (megabytes of it, or bytes that are not UTF-8) back to it and into
// the log. What is quoted of a refused name is cut short.
func checkModelArg(name string) error {
	if config.ModelNamePattern.MatchString(name) {
		return nil
	}
	return status.Errorf(codes.InvalidArgument, "model name %s (%d bytes) cannot be configured: names are 1-128 of letters, digits and . _ : @ + / -", quoted(name), len(name))
}

// quoted is what an error repeats of a value a caller sent: quoted, valid
// UTF-8, at most 64 bytes of it, so that no caller can make vgw send
// (or log) megabytes back.
func quoted(s string) string {
	const most = 64
	s = strings.ToValidUTF8(s, "\uFFFD")
	if len(s) > most {
		return strconv.Quote(strings.ToValidUTF8(s[:most], "")) + "…"
	}
	return strconv.Quote(s)
}
