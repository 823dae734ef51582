package admin

import (
	"context"
	"log/slog"
	"net"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	reflectionv1 "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionv1alpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/status"

	adminv1 "github.com/vgw-project/vgw/proto/adminv1"
)

// authToken has letters in both cases, so that a token sent in another
// case differs from it.
const authToken = "Adm1n-t0ken-Q7xZ"

// countingManager records every call that would change the manager's
// state, so a test sees that a refused RPC reached none of them.
type countingManager struct {
	Manager
	mu    sync.Mutex
	calls []string
}

func (m *countingManager) record(call string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls = append(m.calls, call)
}

func (m *countingManager) Load(ctx context.Context, name string, wait bool) error {
	m.record("Load " + name)
	return m.Manager.Load(ctx, name, wait)
}

func (m *countingManager) Unload(name string) error {
	m.record("Unload " + name)
	return m.Manager.Unload(name)
}

func (m *countingManager) Sleep(ctx context.Context, name string, wait bool) error {
	m.record("Sleep " + name)
	return m.Manager.Sleep(ctx, name, wait)
}

func (m *countingManager) Wake(ctx context.Context, name string, wait bool) error {
	m.record("Wake " + name)
	return m.Manager.Wake(ctx, name, wait)
}

func (m *countingManager) Pin(name string, on bool) error {
	if on {
		m.record("Pin " + name)
	} else {
		m.record("Unpin " + name)
	}
	return m.Manager.Pin(name, on)
}

// reachedLog records each RPC that got past the token check. Its
// interceptors are chained after TokenAuth's, so they see exactly the
// calls the service's handlers would.
type reachedLog struct {
	mu      sync.Mutex
	methods []string
}

func (r *reachedLog) add(method string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.methods = append(r.methods, method)
}

func (r *reachedLog) options() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
			r.add(info.FullMethod)
			return next(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, next grpc.StreamHandler) error {
			r.add(info.FullMethod)
			return next(srv, ss)
		}),
	}
}

// authEnv is the admin service served with TokenAuth over real gRPC on
// loopback, as vgw serve runs it (health and reflection included), with a
// probe on everything an RPC could change.
type authEnv struct {
	conn    *grpc.ClientConn
	client  adminv1.AdminClient
	svc     *Service
	mgr     *countingManager
	adm     *fakeAdmission
	reached *reachedLog
}

func newAuthEnv(t *testing.T) *authEnv {
	t.Helper()
	svc, mgr, adm := newTestService(t)
	e := &authEnv{svc: svc, mgr: &countingManager{Manager: mgr}, adm: adm, reached: &reachedLog{}}
	svc.d.Manager = e.mgr
	srv := grpc.NewServer(append(TokenAuth(authToken), e.reached.options()...)...)
	adminv1.RegisterAdminServer(srv, svc)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	reflection.Register(srv)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	e.conn, err = grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.conn.Close() })
	e.client = adminv1.NewAdminClient(e.conn)
	return e
}

// authState is everything an Admin RPC could change.
type authState struct {
	ManagerCalls []string
	Level        slog.Level
	Draining     bool
	Watchers     int
	Reached      []string
}

func (e *authEnv) state() authState {
	e.mgr.mu.Lock()
	calls := slices.Clone(e.mgr.calls)
	e.mgr.mu.Unlock()
	e.svc.d.Events.mu.Lock()
	watchers := len(e.svc.d.Events.watchers)
	e.svc.d.Events.mu.Unlock()
	e.reached.mu.Lock()
	reached := slices.Clone(e.reached.methods)
	e.reached.mu.Unlock()
	return authState{ManagerCalls: calls, Level: e.svc.d.Level.Level(), Draining: e.adm.Draining(), Watchers: watchers, Reached: reached}
}

// waitNoWatchers waits for the server to end the watches of cancelled
// WatchEvents calls: it learns of the cancel asynchronously.
func (e *authEnv) waitNoWatchers(t *testing.T) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); e.state().Watchers != 0; {
		if time.Now().After(deadline) {
			t.Fatalf("%d watches still open 5s after their calls ended", e.state().Watchers)
		}
		time.Sleep(time.Millisecond)
	}
}

// authCred is what a call presents: authorization values (or another
// header), and the credential in them, which a refusal must not echo.
type authCred struct {
	name   string
	header []string // metadata key-value pairs
	sent   string
}

// refusedCreds are all refused: the scheme is case-insensitive but must
// be Bearer, and the token is compared exactly, case included.
var refusedCreds = []authCred{
	{name: "none"},
	{name: "wrong token", header: []string{"authorization", "Bearer wrong-secret-value"}, sent: "wrong-secret-value"},
	{name: "no token", header: []string{"authorization", "Bearer"}},
	{name: "Basic scheme", header: []string{"authorization", "Basic " + authToken}, sent: authToken},
	{name: "no scheme", header: []string{"authorization", authToken}, sent: authToken},
	{name: "scheme glued to the token", header: []string{"authorization", "Bearer" + authToken}, sent: authToken},
	{name: "token in upper case", header: []string{"authorization", "Bearer " + strings.ToUpper(authToken)}, sent: strings.ToUpper(authToken)},
	{name: "token in lower case", header: []string{"authorization", "Bearer " + strings.ToLower(authToken)}, sent: strings.ToLower(authToken)},
	{name: "prefix of the token", header: []string{"authorization", "Bearer " + authToken[:len(authToken)-1]}, sent: authToken[:len(authToken)-1]},
	{name: "token and more", header: []string{"authorization", "Bearer " + authToken + "x"}, sent: authToken + "x"},
	{name: "token in another header", header: []string{"x-admin-token", authToken}, sent: authToken},
}

// acceptedCreds carry the token. Surrounding spaces are not part of it:
// ReadToken trims the token file, so no token begins or ends in one.
var acceptedCreds = []authCred{
	{name: "Bearer", header: []string{"authorization", "Bearer " + authToken}},
	{name: "bearer in lower case", header: []string{"authorization", "bearer " + authToken}},
	{name: "BEARER in upper case", header: []string{"authorization", "BEARER " + authToken}},
	{name: "trailing space", header: []string{"authorization", "Bearer " + authToken + " "}},
	{name: "two spaces after the scheme", header: []string{"authorization", "Bearer  " + authToken}},
	{name: "a wrong value, then the right one", header: []string{"authorization", "Bearer wrong-secret-value", "authorization", "Bearer " + authToken}},
}

// authRPC is one row of TestTokenAuthEveryRPC.
type authRPC struct {
	name string
	// call makes the RPC; a stream is read up to its first message and
	// left open until ctx ends, so that its watch can be seen.
	call func(context.Context, adminv1.AdminClient) error
	// effect reports whether an accepted call did what it does: it shows
	// that the state probes see a change when there is one.
	effect func(before, after authState) bool
}

// TestTokenAuthEveryRPC calls every Admin RPC over real gRPC with each
// refused credential and checks that the refusal is Unauthenticated,
// echoes no token, and changed nothing: no manager call, no log level, no
// drain, no watch, no handler reached. Then each accepted credential gets
// through. The RPCs come from the service descriptor, so an RPC added
// without a row here fails the test.
func TestTokenAuthEveryRPC(t *testing.T) {
	const llama = "llama"
	// managerCall is the effect of an RPC that makes this one manager call.
	managerCall := func(call string) func(before, after authState) bool {
		return func(b, a authState) bool {
			return slices.Equal(a.ManagerCalls, append(slices.Clip(b.ManagerCalls), call))
		}
	}
	rpcs := []authRPC{
		{name: "GetStatus", call: func(ctx context.Context, c adminv1.AdminClient) error {
			_, err := c.GetStatus(ctx, &adminv1.GetStatusRequest{})
			return err
		}},
		{name: "ListModels", call: func(ctx context.Context, c adminv1.AdminClient) error {
			_, err := c.ListModels(ctx, &adminv1.ListModelsRequest{})
			return err
		}},
		{name: "LoadModel", call: func(ctx context.Context, c adminv1.AdminClient) error {
			_, err := c.LoadModel(ctx, &adminv1.LoadModelRequest{Model: llama})
			return err
		}, effect: managerCall("Load " + llama)},
		{name: "UnloadModel", call: func(ctx context.Context, c adminv1.AdminClient) error {
			_, err := c.UnloadModel(ctx, &adminv1.UnloadModelRequest{Model: llama})
			return err
		}, effect: managerCall("Unload " + llama)},
		{name: "SleepModel", call: func(ctx context.Context, c adminv1.AdminClient) error {
			_, err := c.SleepModel(ctx, &adminv1.SleepModelRequest{Model: llama})
			return err
		}, effect: managerCall("Sleep " + llama)},
		{name: "WakeModel", call: func(ctx context.Context, c adminv1.AdminClient) error {
			_, err := c.WakeModel(ctx, &adminv1.WakeModelRequest{Model: llama})
			return err
		}, effect: managerCall("Wake " + llama)},
		{name: "PinModel", call: func(ctx context.Context, c adminv1.AdminClient) error {
			_, err := c.PinModel(ctx, &adminv1.PinModelRequest{Model: llama})
			return err
		}, effect: managerCall("Pin " + llama)},
		{name: "UnpinModel", call: func(ctx context.Context, c adminv1.AdminClient) error {
			_, err := c.UnpinModel(ctx, &adminv1.UnpinModelRequest{Model: llama})
			return err
		}, effect: managerCall("Unpin " + llama)},
		{name: "SetLogLevel", call: func(ctx context.Context, c adminv1.AdminClient) error {
			_, err := c.SetLogLevel(ctx, &adminv1.SetLogLevelRequest{Level: "debug"})
			return err
		}, effect: func(_, a authState) bool { return a.Level == slog.LevelDebug }},
		{name: "ListDecisions", call: func(ctx context.Context, c adminv1.AdminClient) error {
			_, err := c.ListDecisions(ctx, &adminv1.ListDecisionsRequest{})
			return err
		}},
		{name: "WatchEvents", call: func(ctx context.Context, c adminv1.AdminClient) error {
			stream, err := c.WatchEvents(ctx, &adminv1.WatchEventsRequest{})
			if err != nil {
				return err
			}
			e, err := stream.Recv()
			if err == nil && e.GetKind() != "watching" {
				return status.Errorf(codes.Internal, "first event %v, want watching", e)
			}
			return err
		}, effect: func(_, a authState) bool { return a.Watchers == 1 }},
		{name: "Drain", call: func(ctx context.Context, c adminv1.AdminClient) error {
			_, err := c.Drain(ctx, &adminv1.DrainRequest{Drain: true})
			return err
		}, effect: func(_, a authState) bool { return a.Draining }},
	}

	desc := adminv1.Admin_ServiceDesc
	var served []string
	for _, m := range desc.Methods {
		served = append(served, m.MethodName)
	}
	for _, s := range desc.Streams {
		served = append(served, s.StreamName)
	}
	for _, name := range served {
		if !slices.ContainsFunc(rpcs, func(r authRPC) bool { return r.name == name }) {
			t.Errorf("%s has no row: add one, so its token check is tested", name)
		}
	}

	for _, rpc := range rpcs {
		t.Run(rpc.name, func(t *testing.T) {
			t.Parallel()
			if !slices.Contains(served, rpc.name) {
				t.Fatalf("%s is not an RPC of %s", rpc.name, desc.ServiceName)
			}
			method := "/" + desc.ServiceName + "/" + rpc.name
			e := newAuthEnv(t)
			// do makes the call and takes the state while a stream it
			// opened is still open.
			do := func(c authCred) (authState, error) {
				ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), c.header...), 10*time.Second)
				defer cancel()
				err := rpc.call(ctx, e.client)
				return e.state(), err
			}
			for _, c := range refusedCreds {
				before := e.state()
				after, err := do(c)
				if status.Code(err) != codes.Unauthenticated {
					t.Errorf("%s: %v, want Unauthenticated", c.name, err)
				}
				if msg := status.Convert(err).Message(); strings.Contains(msg, authToken) || c.sent != "" && strings.Contains(msg, c.sent) {
					t.Errorf("%s: the refusal echoes a token: %q", c.name, msg)
				}
				if !reflect.DeepEqual(after, before) {
					t.Errorf("%s: a refused call changed %+v to %+v", c.name, before, after)
				}
			}
			for _, c := range acceptedCreds {
				before := e.state()
				after, err := do(c)
				if status.Code(err) == codes.Unauthenticated {
					t.Errorf("%s: %v", c.name, err)
				}
				if got := after.Reached[len(before.Reached):]; !slices.Equal(got, []string{method}) {
					t.Errorf("%s: reached %v, want %s", c.name, got, method)
				}
				if rpc.effect != nil && !rpc.effect(before, after) {
					t.Errorf("%s: no effect: %+v, then %+v", c.name, before, after)
				}
				e.waitNoWatchers(t)
			}
		})
	}
}

// TestTokenAuthExempt: health checks and reflection answer with no token
// or a wrong one, so that probes and `grpcurl list` work; and the
// exemption is for those services alone, not for names that begin alike.
func TestTokenAuthExempt(t *testing.T) {
	e := newAuthEnv(t)
	for _, c := range refusedCreds[:2] {
		ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), c.header...), 10*time.Second)
		defer cancel()
		if _, err := healthpb.NewHealthClient(e.conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
			t.Errorf("health, %s: %v", c.name, err)
		}
		v1, err := reflectionv1.NewServerReflectionClient(e.conn).ServerReflectionInfo(ctx)
		if err == nil {
			err = v1.Send(&reflectionv1.ServerReflectionRequest{MessageRequest: &reflectionv1.ServerReflectionRequest_ListServices{}})
		}
		var r1 *reflectionv1.ServerReflectionResponse
		if err == nil {
			r1, err = v1.Recv()
		}
		if err != nil || !slices.ContainsFunc(r1.GetListServicesResponse().GetService(), func(s *reflectionv1.ServiceResponse) bool {
			return s.GetName() == adminv1.Admin_ServiceDesc.ServiceName
		}) {
			t.Errorf("reflection v1, %s: %v %v", c.name, r1, err)
		}
		// Deprecated, but grpcurl falls back to it against older servers,
		// and vgw registers both.
		v1alpha, err := reflectionv1alpha.NewServerReflectionClient(e.conn).ServerReflectionInfo(ctx)
		if err == nil {
			//lint:ignore SA1019 the v1alpha service is what is under test
			err = v1alpha.Send(&reflectionv1alpha.ServerReflectionRequest{MessageRequest: &reflectionv1alpha.ServerReflectionRequest_ListServices{}})
		}
		if err == nil {
			_, err = v1alpha.Recv()
		}
		if err != nil {
			t.Errorf("reflection v1alpha, %s: %v", c.name, err)
		}
	}

	tests := []struct {
		method string
		exempt bool
	}{
		{"/grpc.health.v1.Health/Check", true},
		{"/grpc.health.v1.Health/Watch", true},
		{"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", true},
		{"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", true},
		{"/vgw.admin.v1.Admin/Drain", false},
		{"/grpc.health.v1.HealthX/Check", false},
		{"/grpc.health.v1.Health", false},
		{"/vgw.admin.v1.Admin/grpc.health.v1.Health/", false},
		{"", false},
	}
	for _, tt := range tests {
		if got := unguarded(tt.method); got != tt.exempt {
			t.Errorf("unguarded(%q) = %v, want %v", tt.method, got, tt.exempt)
		}
	}
}
