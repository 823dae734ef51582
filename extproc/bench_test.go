package extproc

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
)

// readyLeases leases every model at once, as for a resident model.
type readyLeases struct{}

func (readyLeases) TryLease(string, string) (Lease, bool)                { return noLease{}, true }
func (readyLeases) Lease(context.Context, string, string) (Lease, error) { return noLease{}, nil }

type noLease struct{}

func (noLease) Release(Result) {}

// discardStream is a server stream whose sends go nowhere, so a benchmark
// measures vgw's work on a message and not gRPC's.
type discardStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (d *discardStream) Context() context.Context                    { return d.ctx }
func (d *discardStream) Send(*extprocv3.ProcessingResponse) error    { return nil }
func (d *discardStream) Recv() (*extprocv3.ProcessingRequest, error) { return nil, io.EOF }

func benchServer(level slog.Level) *Server {
	log := slog.New(slog.NewJSONHandler(io.Discard, &slog.HandlerOptions{Level: level}))
	return New([]Model{{Name: "llama-3.1-8b", Cluster: "model/llama-3.1-8b", Limits: Limits{MaxConcurrent: 1 << 20, MaxQueue: 1 << 20, QueueTimeout: time.Minute}}},
		readyLeases{}, Options{Log: log})
}

// BenchmarkExtractModel times reading the model from chat bodies of 1 KiB
// and 32 KiB, with the model key first and last, in prose (chatBody) and
// in the scanner's worst case of short escaped strings (denseChatBody).
// impl=json is the baseline: encoding/json decoding the same body into a
// struct with a Model field, the way one would write it without care.
func BenchmarkExtractModel(b *testing.B) {
	var naive struct {
		Model string `json:"model"`
	}
	impls := []struct {
		name string
		f    func([]byte) error
	}{
		{"vgw", func(body []byte) error { _, err := ExtractModel(body); return err }},
		{"json", func(body []byte) error { return json.Unmarshal(body, &naive) }},
	}
	for _, size := range []int{1 << 10, 32 << 10} {
		for _, shape := range []string{"prose", "dense"} {
			for _, first := range []bool{true, false} {
				if shape == "dense" && first {
					continue // the model comes before any string: same as prose
				}
				body := chatBody(size, first)
				if shape == "dense" {
					body = denseChatBody(size, first)
				}
				for _, impl := range impls {
					name := fmt.Sprintf("size=%dKiB/%s/model=%s/impl=%s", size>>10, shape, map[bool]string{true: "first", false: "last"}[first], impl.name)
					b.Run(name, func(b *testing.B) {
						b.SetBytes(int64(len(body)))
						b.ReportAllocs()
						for b.Loop() {
							if err := impl.f(body); err != nil {
								b.Fatal(err)
							}
						}
					})
				}
			}
		}
	}
}

// BenchmarkLongString times stepping over one 30 KiB string, where the
// vector search does the work.
func BenchmarkLongString(b *testing.B) {
	body := []byte(`{"prompt":"` + strings.Repeat("All work and no play makes Jack a dull boy. ", 700) + `","model":"m"}`)
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		if _, err := ExtractModel(body); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAdmitRelease times the admission core of one request: extract
// the model, look it up, take a slot, ask the manager for the route,
// record the decision (and log it where the level allows), give the slot
// back and report the result. This is the work vgw adds per request on top
// of gRPC; the protobuf answer is measured in BenchmarkStream.
func BenchmarkAdmitRelease(b *testing.B) {
	for _, level := range []slog.Level{slog.LevelInfo, slog.LevelDebug} {
		for _, first := range []bool{true, false} {
			s := benchServer(level)
			body := chatBody(1<<10, first)
			ctx := context.Background()
			b.Run("level="+level.String()+"/model="+map[bool]string{true: "first", false: "last"}[first], func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					admitRelease(ctx, s, body)
				}
			})
		}
	}
}

// BenchmarkAdmitReleaseNaive is the baseline for BenchmarkAdmitRelease:
// the same steps done the plain way, as the Python gateway did them, with
// encoding/json for the model, one lock around the counters, and a log
// line per request at info level.
func BenchmarkAdmitReleaseNaive(b *testing.B) {
	log := slog.New(slog.NewJSONHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelInfo}))
	var mu sync.Mutex
	inflight := map[string]int{"llama-3.1-8b": 0}
	for _, first := range []bool{true, false} {
		body := chatBody(1<<10, first)
		b.Run("model="+map[bool]string{true: "first", false: "last"}[first], func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				var req struct {
					Model string `json:"model"`
				}
				if err := json.Unmarshal(body, &req); err != nil {
					b.Fatal(err)
				}
				start := time.Now()
				mu.Lock()
				inflight[req.Model]++
				log.Info("admitted", "model", req.Model, "in_flight", inflight[req.Model])
				mu.Unlock()
				mu.Lock()
				inflight[req.Model]--
				mu.Unlock()
				log.Info("finished", "model", req.Model, "duration", time.Since(start))
			}
		})
	}
}

// admitRelease is the admission core, in the order the stream runs it,
// with the same two clock reads: at the decision and at the response's end.
// The request is tenant-7's at objective batch, which a server with
// fairness (fairServer) knows.
func admitRelease(ctx context.Context, s *Server, body []byte) {
	k := s.flows.Load().key(benchTenant, benchObjective)
	name, err := ExtractModel(body)
	if err != nil {
		panic(err)
	}
	m := s.models.Load().lookup(name).model
	if m == nil || !m.gate.tryAcquire(time.Now(), k, len(body)) {
		panic("not admitted")
	}
	l, ok := s.leases.TryLease("", m.name)
	if !ok {
		panic("no lease")
	}
	_ = m.route.Load()
	start := time.Now()
	st := stream{s: s, ctx: ctx, model: m, key: k}
	st.record(&decision{at: start, model: &m.name, outcome: OutcomeAdmitted, reason: ReasonSlotFree})
	m.gate.release(0)
	l.Release(Result{Status: 200, Duration: time.Since(start)})
}

var benchTenant, benchObjective = []byte("tenant-7"), []byte("batch")

// fairServer is benchServer with 100 tenants (weights 1 to 3) at three
// priorities.
func fairServer() *Server {
	s := benchServer(slog.LevelInfo)
	s.SetFairness(benchFairness(false))
	return s
}

func benchFairness(vtc bool) Fairness {
	tenants := make([]Tenant, 100)
	for i := range tenants {
		tenants[i] = Tenant{Name: "tenant-" + strconv.Itoa(i), Weight: 1 + i%3, MaxQueue: -1}
	}
	return Fairness{Tenants: tenants, Objectives: map[string]int{"interactive": 10, "batch": -10}, VTC: vtc}
}

func TestAdmitReleaseAllocs(t *testing.T) {
	for _, s := range []*Server{benchServer(slog.LevelInfo), namedServer(), fairServer()} {
		for _, first := range []bool{true, false} {
			body := chatBody(1<<10, first)
			if n := testing.AllocsPerRun(200, func() { admitRelease(context.Background(), s, body) }); n != 0 {
				t.Errorf("model first=%v: %v allocs per request at info level, want 0", first, n)
			}
		}
	}
}

// namedServer serves 200 models with 5 aliases and 5 adapters each; the
// bodies of chatBody name one model's alias.
func namedServer() *Server {
	var models []Model
	for i := range 200 {
		m := Model{Name: fmt.Sprintf("model-%d", i), Cluster: fmt.Sprintf("model/%d", i), Limits: Limits{MaxConcurrent: 1 << 20, MaxQueue: 1 << 20, QueueTimeout: time.Minute}}
		for j := range 5 {
			m.Aliases = append(m.Aliases, fmt.Sprintf("org-%d/model-%d-v%d", i, i, j))
			m.Adapters = append(m.Adapters, fmt.Sprintf("model-%d-lora-%d", i, j))
		}
		if i == 137 {
			m.Aliases[3] = "llama-3.1-8b"
		}
		models = append(models, m)
	}
	return New(models, readyLeases{}, Options{Log: slog.New(slog.NewJSONHandler(io.Discard, nil))})
}

// BenchmarkAdmitReleaseNames is BenchmarkAdmitRelease where the request
// names an alias of one of 200 models that have 5 aliases and 5 adapters
// each (2,200 names), against one model named by its key, in one run.
func BenchmarkAdmitReleaseNames(b *testing.B) {
	body := chatBody(1<<10, false)
	ctx := context.Background()
	for _, bc := range []struct {
		name string
		s    *Server
	}{{"one_model", benchServer(slog.LevelInfo)}, {"2200_names", namedServer()}, {"300_flows", fairServer()}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				admitRelease(ctx, bc.s, body)
			}
		})
	}
}

// BenchmarkStream runs one whole request through the stream handler, the
// way Envoy's messages arrive (headers, buffered body, response headers
// that end the response), answers included, with sends discarded.
func BenchmarkStream(b *testing.B) {
	withDefaults := func(level slog.Level, defaults string) *Server {
		s := benchServer(level)
		s.SetModels([]Model{{Name: "llama-3.1-8b", Cluster: "model/llama-3.1-8b", Defaults: []byte(defaults),
			Limits: Limits{MaxConcurrent: 1 << 20, MaxQueue: 1 << 20, QueueTimeout: time.Minute}}})
		return s
	}
	for _, bc := range []struct {
		name string
		s    *Server
	}{
		{"level=INFO", benchServer(slog.LevelInfo)},
		{"level=DEBUG", benchServer(slog.LevelDebug)},
		// Request defaults: keys the body has (temperature, max_tokens),
		// then two more it lacks, merged in.
		{"level=INFO/defaults=present", withDefaults(slog.LevelInfo, `{"temperature":0.2,"max_tokens":64}`)},
		{"level=INFO/defaults=merged", withDefaults(slog.LevelInfo, `{"top_p":0.9,"seed":7}`)},
		// The body names an alias: it goes on renamed to the model's own name.
		{"level=INFO/alias", func() *Server {
			s := benchServer(slog.LevelInfo)
			s.SetModels([]Model{{Name: "llama", Aliases: []string{"llama-3.1-8b"}, Cluster: "model/llama",
				Limits: Limits{MaxConcurrent: 1 << 20, MaxQueue: 1 << 20, QueueTimeout: time.Minute}}})
			return s
		}()},
	} {
		s := bc.s
		body := chatBody(1<<10, false)
		msgs := []*extprocv3.ProcessingRequest{
			{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
				{Key: ":method", RawValue: []byte("POST")}, {Key: ":path", RawValue: []byte("/v1/chat/completions")},
				{Key: "content-type", RawValue: []byte("application/json")}, {Key: "content-length", RawValue: []byte(strconv.Itoa(len(body)))},
			}}}}},
			{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: body, EndOfStream: true}}},
			{Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{EndOfStream: true, Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
				{Key: ":status", RawValue: []byte("200")},
			}}}}},
		}
		srv := &discardStream{ctx: context.Background()}
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				st := newStream(s, srv)
				for _, m := range msgs {
					if _, err := st.handle(m); err != nil {
						b.Fatal(err)
					}
				}
				st.close()
			}
		})
	}
}

// BenchmarkQueueDepth times a new request joining the tail of a queue of
// the given depth and a finishing request handing its slot to the waiter
// whose turn it is: the costs a long queue must not raise. flows=1 is one
// FIFO (no fairness configured); flows=300 is 100 tenants at 3
// priorities, the waiters spread over all of them, each arrival of the
// next tenant at the next priority, under weighted round robin or VTC.
func BenchmarkQueueDepth(b *testing.B) {
	var names [][]byte
	for _, t := range benchFairness(false).Tenants {
		names = append(names, []byte(t.Name))
	}
	objectives := [][]byte{[]byte("interactive"), nil, []byte("batch")}
	fair := func(vtc bool) *flowTable { return newFlowTable(benchFairness(vtc), nil) }
	for _, tc := range []struct {
		name string
		t    *flowTable
	}{{"flows=1", fifo}, {"flows=300/round_robin", fair(false)}, {"flows=300/vtc", fair(true)}} {
		for _, depth := range []int{0, 10, 1000, 10000} {
			b.Run(tc.name+"/depth="+strconv.Itoa(depth), func(b *testing.B) {
				keys := make([]flowKey, 3*len(names)+1) // coprime with both
				for i := range keys {
					keys[i] = tc.t.key(names[i%len(names)], objectives[i%len(objectives)])
				}
				g := newGate(Limits{MaxConcurrent: 1, MaxQueue: depth + 2, QueueTimeout: time.Minute}, tc.t)
				if !g.tryAcquire(time.Now(), keys[0], 100) {
					b.Fatal("first slot")
				}
				now := time.Now()
				for i := range depth {
					w := &waiter{ready: make(chan struct{}, 1)}
					if res, _ := g.enqueue(w, now, keys[i%len(keys)], 100+i%1000); res != enqueued {
						b.Fatal("not queued")
					}
				}
				spare := &waiter{ready: make(chan struct{}, 1)}
				i := depth
				b.ReportAllocs()
				for b.Loop() {
					// One joins, the slot moves to the waiter whose turn it
					// is, which, now holding it, leaves; depth is back where
					// it was, and the one that left joins next.
					i++
					if res, _ := g.enqueue(spare, now, keys[i%len(keys)], 100+i%1000); res != enqueued {
						b.Fatal("not queued")
					}
					next := g.peek()
					g.release(0)
					<-next.ready
					spare = next
				}
			})
		}
	}
}

// peek returns the waiter whose turn it is, without taking it out; for
// the benchmark, which is the gate's only user.
func (g *gate) peek() *waiter {
	_, f := g.turnOfLocked()
	return f.q.head
}
