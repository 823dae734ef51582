package admin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/manager"
	adminv1 "github.com/vgw-project/vgw/proto/adminv1"
	"github.com/vgw-project/vgw/xds"
)

// Manager is the GPU manager as the admin service needs it.
type Manager interface {
	Status() []manager.ModelStatus
	GPUs() []manager.GPUStatus
	Load(ctx context.Context, name string, wait bool) error
	Unload(name string) error
	Pin(name string, on bool) error
}

// Admission is the request path as the admin service needs it.
type Admission interface {
	AllStats() map[string]extproc.GateStats
	Counts() map[string]extproc.Counts
	Decisions() *extproc.DecisionLog
	SetDraining(on bool)
	Draining() bool
}

// Envoys is the xDS server as the admin service needs it.
type Envoys interface {
	Status() ([]xds.NodeStatus, []xds.NACK)
	Version() string
	Counters() xds.Counters
}

// Deps are what the admin service reports on and acts on.
type Deps struct {
	Manager   Manager
	Admission Admission
	Envoys    Envoys
	// Level is the live log level, which SetLogLevel changes.
	Level *slog.LevelVar
	// Config returns the config in force.
	Config func() *config.Config
	// Cluster names a model's Envoy cluster.
	Cluster func(model string) string
	Events  *Hub
	Log     *slog.Logger
	Version string
	Started time.Time
}

// Service implements vgw.admin.v1.Admin.
type Service struct {
	adminv1.UnimplementedAdminServer
	d Deps
}

// NewService returns the admin service over d.
func NewService(d Deps) *Service { return &Service{d: d} }

// Status is what GetStatus and /status report.
func (s *Service) Status() *adminv1.Status {
	gpus := s.d.Manager.GPUs()
	nodes, _ := s.d.Envoys.Status()
	st := &adminv1.Status{
		Version:    s.d.Version,
		Started:    timestamppb.New(s.d.Started),
		Draining:   s.d.Admission.Draining(),
		Models:     s.models(),
		Config:     s.config(),
		XdsVersion: s.d.Envoys.Version(),
	}
	for _, g := range gpus {
		st.Gpus = append(st.Gpus, &adminv1.GPU{
			Index: int32(g.Index), Name: g.Name, Uuid: g.UUID,
			TotalBytes: g.Total, UsedBytes: g.Used, FreeBytes: g.Total - min(g.Used, g.Total),
		})
	}
	for _, n := range nodes {
		en := &adminv1.EnvoyNode{Node: n.Node, Streams: int32(n.Streams), ClustersVersion: n.Clusters, EndpointsVersion: n.Routes}
		if n.LastNACK != nil {
			en.LastNack = nack(*n.LastNACK)
		}
		st.Envoys = append(st.Envoys, en)
	}
	return st
}

func nack(n xds.NACK) *adminv1.NACK {
	return &adminv1.NACK{Time: timestamppb.New(n.Time), Node: n.Node, TypeUrl: n.TypeURL, Version: n.Version, Error: n.Error}
}

// models renders every model: the manager's view, with the admission
// state and limits of the request path.
func (s *Service) models() []*adminv1.Model {
	gates := s.d.Admission.AllStats()
	var out []*adminv1.Model
	for _, m := range s.d.Manager.Status() {
		out = append(out, s.model(m, gates[m.Name]))
	}
	return out
}

func (s *Service) model(m manager.ModelStatus, g extproc.GateStats) *adminv1.Model {
	pm := &adminv1.Model{
		Name: m.Name, State: m.State.String(), Instance: m.Instance, Endpoint: m.Addr,
		FootprintBytes: m.PerGPU, FootprintSource: m.Footprint,
		InFlight: m.InFlight, QueueDepth: int32(g.Queued),
		MaxConcurrent: int32(g.Limits.MaxConcurrent), MaxQueue: int32(g.Limits.MaxQueue), QueueTimeout: durationpb.New(g.Limits.QueueTimeout),
		AlwaysOn: m.AlwaysOn, Pinned: m.Pinned, LastError: m.LastError, Cluster: s.d.Cluster(m.Name),
		WaitingForLoad: int32(m.Waiting),
	}
	for _, g := range m.GPUs {
		pm.Gpus = append(pm.Gpus, int32(g))
	}
	if !m.LastUsed.IsZero() {
		pm.LastUsed = timestamppb.New(m.LastUsed)
	}
	if !m.Since.IsZero() {
		pm.Since = timestamppb.New(m.Since)
	}
	if m.RetryAt.After(time.Now()) {
		pm.RetryAt = timestamppb.New(m.RetryAt)
	}
	return pm
}

// config renders the config in force. It leaves out every env map: they
// carry secrets (HF_TOKEN and the like).
func (s *Service) config() *adminv1.Config {
	c := s.d.Config()
	return &adminv1.Config{
		Path: c.Path, LogLevel: strings.ToLower(s.d.Level.Level().String()),
		Runtime: c.Runtime.Kind, Image: c.Runtime.Image,
		MaxConcurrent: int32(c.MaxConcurrent), MaxQueue: int32(c.MaxQueue),
		QueueTimeout: durationpb.New(c.QueueTimeout.Std()), LoadTimeout: durationpb.New(c.LoadTimeout.Std()),
		InactivityTimeout: durationpb.New(c.InactivityTimeout.Std()), MaxModels: int32(c.MaxModels),
		MinResident: durationpb.New(c.MinResident.Std()), MaxBodyBytes: uint64(c.MaxBodyBytes),
		DrainTimeout: durationpb.New(c.DrainTimeout.Std()), MaxMessageTimeout: durationpb.New(c.Envoy.MaxMessageTimeout.Std()),
		Listen: map[string]string{"extproc": c.Listen.ExtProc, "xds": c.Listen.XDS, "admin": c.Listen.Admin, "http": c.Listen.HTTP},
	}
}

func (s *Service) GetStatus(context.Context, *adminv1.GetStatusRequest) (*adminv1.Status, error) {
	return s.Status(), nil
}

func (s *Service) ListModels(context.Context, *adminv1.ListModelsRequest) (*adminv1.ListModelsResponse, error) {
	return &adminv1.ListModelsResponse{Models: s.models()}, nil
}

// one reports one model, after an action on it.
func (s *Service) one(name string) (*adminv1.Model, error) {
	gates := s.d.Admission.AllStats()
	for _, m := range s.d.Manager.Status() {
		if m.Name == name {
			return s.model(m, gates[name]), nil
		}
	}
	return nil, status.Errorf(codes.NotFound, "model %q is not configured", name)
}

// grpcError maps the manager's errors to gRPC codes an operator can act on.
func grpcError(err error) error {
	var nr *manager.NoRoom
	var le *manager.LoadError
	switch {
	case err == nil:
		return nil
	case errors.Is(err, manager.ErrUnknownModel):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "the model is not ready yet: "+err.Error())
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	case errors.As(err, &nr), errors.As(err, &le):
		return status.Error(codes.Unavailable, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

func (s *Service) LoadModel(ctx context.Context, req *adminv1.LoadModelRequest) (*adminv1.LoadModelResponse, error) {
	if req.GetWait() {
		timeout := s.d.Config().LoadTimeout.Std()
		if t := req.GetTimeout(); t != nil {
			timeout = t.AsDuration()
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	if err := s.d.Manager.Load(ctx, req.GetModel(), req.GetWait()); err != nil {
		return nil, grpcError(err)
	}
	s.audit(ctx, "load", req.GetModel())
	m, err := s.one(req.GetModel())
	return &adminv1.LoadModelResponse{Model: m}, err
}

func (s *Service) UnloadModel(ctx context.Context, req *adminv1.UnloadModelRequest) (*adminv1.UnloadModelResponse, error) {
	if err := s.d.Manager.Unload(req.GetModel()); err != nil {
		return nil, grpcError(err)
	}
	s.audit(ctx, "unload", req.GetModel())
	m, err := s.one(req.GetModel())
	return &adminv1.UnloadModelResponse{Model: m}, err
}

func (s *Service) PinModel(ctx context.Context, req *adminv1.PinModelRequest) (*adminv1.PinModelResponse, error) {
	if err := s.d.Manager.Pin(req.GetModel(), true); err != nil {
		return nil, grpcError(err)
	}
	s.audit(ctx, "pin", req.GetModel())
	m, err := s.one(req.GetModel())
	return &adminv1.PinModelResponse{Model: m}, err
}

func (s *Service) UnpinModel(ctx context.Context, req *adminv1.UnpinModelRequest) (*adminv1.UnpinModelResponse, error) {
	if err := s.d.Manager.Pin(req.GetModel(), false); err != nil {
		return nil, grpcError(err)
	}
	s.audit(ctx, "unpin", req.GetModel())
	m, err := s.one(req.GetModel())
	return &adminv1.UnpinModelResponse{Model: m}, err
}

func (s *Service) SetLogLevel(ctx context.Context, req *adminv1.SetLogLevelRequest) (*adminv1.SetLogLevelResponse, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(req.GetLevel())); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "level %q is not one of debug, info, warn, error", req.GetLevel())
	}
	prev := s.d.Level.Level()
	s.d.Level.Set(l)
	s.audit(ctx, "set_log_level", l.String())
	return &adminv1.SetLogLevelResponse{Previous: strings.ToLower(prev.String()), Level: strings.ToLower(l.String())}, nil
}

func (s *Service) ListDecisions(_ context.Context, req *adminv1.ListDecisionsRequest) (*adminv1.ListDecisionsResponse, error) {
	f := extproc.Filter{Model: req.GetModel(), Limit: int(req.GetLimit())}
	if f.Limit <= 0 {
		f.Limit = 100
	}
	if o := req.GetOutcome(); o != "" {
		out, ok := extproc.ParseOutcome(o)
		if !ok {
			return nil, status.Errorf(codes.InvalidArgument, "outcome %q is not one of admitted, queued, rejected, timed_out, abandoned", o)
		}
		f.Outcome = out
	}
	resp := &adminv1.ListDecisionsResponse{}
	for _, d := range s.d.Admission.Decisions().Recent(f) {
		resp.Decisions = append(resp.Decisions, &adminv1.Decision{
			Time: timestamppb.New(d.Time), Model: d.Model, Outcome: d.Outcome.String(), Reason: d.Reason.String(),
			Status: int32(d.Status), QueueDepth: int32(d.QueueDepth), Wait: durationpb.New(d.Wait),
		})
	}
	return resp, nil
}

// WatchEvents first sends a "watching" event, so that the operator (and a
// script) knows the watch is live before anything happens, then every
// event as it comes.
func (s *Service) WatchEvents(req *adminv1.WatchEventsRequest, stream adminv1.Admin_WatchEventsServer) error {
	events := s.d.Events.Watch(stream.Context(), req.GetModel())
	what := "all models"
	if m := req.GetModel(); m != "" {
		what = "model " + m
	}
	if err := stream.Send(&adminv1.Event{Time: timestamppb.Now(), Kind: "watching", Model: req.GetModel(), Detail: "events for " + what + " follow"}); err != nil {
		return err
	}
	for e := range events {
		if err := stream.Send(&adminv1.Event{Time: timestamppb.New(e.Time), Kind: e.Kind, Model: e.Model, Detail: e.Detail}); err != nil {
			return err
		}
	}
	// The watch ends only when its caller leaves (or vgw stops).
	return status.FromContextError(stream.Context().Err()).Err()
}

func (s *Service) Drain(ctx context.Context, req *adminv1.DrainRequest) (*adminv1.DrainResponse, error) {
	s.d.Admission.SetDraining(req.GetDrain())
	s.audit(ctx, "drain", fmt.Sprint(req.GetDrain()))
	var inflight int64
	for _, g := range s.d.Admission.AllStats() {
		inflight += int64(g.InFlight)
	}
	return &adminv1.DrainResponse{Draining: s.d.Admission.Draining(), InFlight: inflight}, nil
}

// audit logs an operator's action: who changed what is the first question
// on call.
func (s *Service) audit(ctx context.Context, action, target string) {
	s.d.Log.LogAttrs(ctx, slog.LevelInfo, "admin action", slog.String("action", action), slog.String("target", target))
}

// WatchRejections publishes a "rejected" event once a second for each
// model whose requests vgw answered with errors in that second, until ctx
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
		for model, c := range cur {
			var parts []string
			statuses := make([]int, 0, len(c.Statuses))
			for st := range c.Statuses {
				statuses = append(statuses, st)
			}
			sort.Ints(statuses)
			for _, st := range statuses {
				if n := c.Statuses[st] - prev[model].Statuses[st]; n > 0 && st != 0 {
					parts = append(parts, fmt.Sprintf("%d answered %d", n, st))
				}
			}
			if len(parts) > 0 {
				detail := strings.Join(parts, ", ") + " in the last " + every.String()
				if model == "" {
					detail += ", for requests that named no configured model"
				}
				s.d.Events.Publish(Event{Time: time.Now(), Kind: "rejected", Model: model, Detail: detail})
			}
		}
		prev = cur
	}
}
