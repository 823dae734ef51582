package extproc_test

import (
	"context"
	"errors"
	"math"
	"net"
	"slices"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/jonboulle/clockwork"

	"github.com/vgw-project/vgw/envoy"
	"github.com/vgw-project/vgw/envoy/envoytest"
	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/internal/poll"
)

// repoFilter reads the ext_proc filter settings from the bootstrap vgw
// ships, so the Envoy these tests play is configured as the real one.
func repoFilter(t testing.TB) extproctest.Filter {
	t.Helper()
	b, err := envoy.Load("../envoy/envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	f, err := envoytest.Filter(b)
	if err != nil {
		t.Fatal(err)
	}
	// The route's body buffer limit is Envoy's own 413.
	if f.BufferLimit == 0 {
		t.Fatal("envoy.yaml has no route for vgw's clusters")
	}
	return f
}

// fakeLeases stands in for the GPU manager and the xDS server. Models are
// resident unless marked loading; a loading model's Lease waits for its
// load to be closed. Every lease given back is observed.
type fakeLeases struct {
	mu       sync.Mutex
	loading  map[string]chan error // closed or sent to when the load ends
	observed []observation
	obsCh    chan observation
}

type observation struct {
	model string
	res   extproc.Result
}

func newFakeLeases() *fakeLeases {
	return &fakeLeases{loading: map[string]chan error{}, obsCh: make(chan observation, 10000)}
}

func clusterOf(model string) string { return "vgw/" + model }

// fakeLease is one request's lease; releasing it twice fails the test
// run (observed twice).
type fakeLease struct {
	l     *fakeLeases
	model string
}

func (f fakeLease) Release(r extproc.Result) {
	f.l.mu.Lock()
	f.l.observed = append(f.l.observed, observation{f.model, r})
	f.l.mu.Unlock()
	f.l.obsCh <- observation{f.model, r}
}

func (m *fakeLeases) TryLease(_, model string) (extproc.Lease, bool) {
	m.mu.Lock()
	_, loading := m.loading[model]
	m.mu.Unlock()
	if loading {
		return nil, false
	}
	return fakeLease{m, model}, true
}

func (m *fakeLeases) Lease(ctx context.Context, _, model string) (extproc.Lease, error) {
	m.mu.Lock()
	ch, loading := m.loading[model]
	m.mu.Unlock()
	if !loading {
		return fakeLease{m, model}, nil
	}
	select {
	case err, ok := <-ch:
		if ok && err != nil {
			return nil, err
		}
		m.mu.Lock()
		delete(m.loading, model)
		m.mu.Unlock()
		return fakeLease{m, model}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// startLoading marks model as not resident; closing (or sending an error
// on) the returned channel ends the load.
func (m *fakeLeases) startLoading(model string) chan error {
	ch := make(chan error, 1)
	m.mu.Lock()
	m.loading[model] = ch
	m.mu.Unlock()
	return ch
}

// withClusters gives each model its cluster, as vgw's wiring does.
func withClusters(models []extproc.Model) []extproc.Model {
	out := slices.Clone(models)
	for i := range out {
		if out[i].Cluster == "" {
			out[i].Cluster = clusterOf(out[i].Name)
		}
	}
	return out
}

type harness struct {
	srv    *extproc.Server
	leases *fakeLeases
	conn   *grpc.ClientConn
	env    *extproctest.Envoy
	up     *upstreams
	// clock runs the Envoy's message timer. It moves only when a test
	// advances it, so no reply is late however slow the machine: what vgw
	// does about the timer shows in the overrides it asks for.
	clock *clockwork.FakeClock
}

// start runs an ext_proc server on a loopback listener and an Envoy that
// talks to it over real gRPC.
// start serves models with at most one Options, whose message timeouts
// are the shipped bootstrap's unless it sets them.
func start(t testing.TB, models []extproc.Model, opts ...extproc.Options) *harness {
	t.Helper()
	return startEdited(t, models, nil, opts...)
}

// startEdited is start with the Envoy's filter edited, as an operator
// would edit envoy.yaml.
func startEdited(t testing.TB, models []extproc.Model, edit func(*extproctest.Filter), opts ...extproc.Options) *harness {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{leases: newFakeLeases(), up: newUpstreams(), clock: clockwork.NewFakeClock()}
	f := repoFilter(t)
	f.Clock = h.clock
	var o extproc.Options
	if len(opts) > 0 {
		o = opts[0]
	}
	if o.MessageTimeout == 0 { // the bootstrap's, unless the test sets its own
		o.MessageTimeout, o.MaxMessageTimeout = f.MessageTimeout, f.MaxMessageTimeout
	}
	if o.TrustModelHeader {
		// An operator who trusts x-vgw-model keeps it: envoy.yaml says to
		// strip only the others then.
		f.StripHeader = func(k string) bool { return k == extproc.HeaderCluster || k == extproc.HeaderQueueDepth }
	}
	if edit != nil {
		edit(&f)
	}
	h.srv = extproc.New(withClusters(models), h.leases, o)
	g := grpc.NewServer(h.srv.ServerOptions()...)
	h.srv.Register(g)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	h.conn, err = grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32))) // as Envoy's: no limit
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.conn.Close() })
	h.env = extproctest.New(h.conn, f, h.up.serve)
	return h
}

// upstreams plays the model servers. By default each answers 200 at once;
// a test can hold responses open with hold.
type upstreams struct {
	mu      sync.Mutex
	held    map[string]chan *held // by request id header
	stalled map[string]bool       // never answer these; see stall
	arrived chan *extproctest.Forwarded
}

type held struct {
	fwd    *extproctest.Forwarded
	chunks chan []byte
}

func newUpstreams() *upstreams {
	return &upstreams{held: map[string]chan *held{}, stalled: map[string]bool{}, arrived: make(chan *extproctest.Forwarded, 10000)}
}

// stall makes the request whose x-request-id is id get no response
// headers until the client goes away.
func (u *upstreams) stall(id string) {
	u.mu.Lock()
	u.stalled[id] = true
	u.mu.Unlock()
}

// hold makes the request whose x-request-id is id stream its response:
// the returned channel yields the response's chunk channel once the request
// arrives; closing that ends the response.
func (u *upstreams) hold(id string) chan *held {
	ch := make(chan *held, 1)
	u.mu.Lock()
	u.held[id] = ch
	u.mu.Unlock()
	return ch
}

func (u *upstreams) serve(ctx context.Context, f *extproctest.Forwarded) (*extproctest.Response, error) {
	u.arrived <- f
	u.mu.Lock()
	ch, ok := u.held[f.Get("x-request-id")]
	stalled := u.stalled[f.Get("x-request-id")]
	u.mu.Unlock()
	if stalled {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if !ok {
		return &extproctest.Response{Status: 200, Headers: []extproctest.Header{{Key: "content-type", Value: "application/json"}},
			Body: []byte(`{"choices":[]}`)}, nil
	}
	chunks := make(chan []byte)
	ch <- &held{fwd: f, chunks: chunks}
	return &extproctest.Response{Status: 200, Headers: []extproctest.Header{{Key: "content-type", Value: "text/event-stream"}},
		Stream: chunks}, nil
}

func (h *harness) stats(t testing.TB, model string) extproc.GateStats {
	t.Helper()
	st, ok := h.srv.Stats(model)
	if !ok {
		t.Fatalf("no stats for model %q", model)
	}
	return st
}

// idle waits until model has nothing in flight or queued: every slot taken
// has been given back.
func (h *harness) idle(t testing.TB, model string) {
	t.Helper()
	poll.Until(t, model+" is idle", func() bool {
		st := h.stats(t, model)
		return st.InFlight == 0 && st.Queued == 0
	})
}

var errLoad = errors.New("no GPU has room: needs 40 GiB, 12 GiB free")

// async sends a request in the background; its result arrives on the
// returned channel.
func (h *harness) async(t *testing.T, ctx context.Context, r extproctest.Request) <-chan *extproctest.Result {
	done := make(chan *extproctest.Result, 1)
	go func() {
		res, err := h.env.Do(ctx, r)
		if err != nil {
			t.Errorf("Envoy: %v", err)
		} else if res.Bypassed {
			t.Error("the server ended the stream with OK before answering")
		}
		done <- res
	}()
	return done
}

// streaming sends request id for model and returns once the upstream has
// it, holding the response open until the test closes its chunks.
func (h *harness) streaming(t *testing.T, ctx context.Context, id, model string) (*held, <-chan *extproctest.Result) {
	hold := h.up.hold(id)
	done := h.async(t, ctx, req(id, chat(model)))
	return <-hold, done
}
