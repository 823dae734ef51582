package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/internal/poll"
)

// front serves HTTP as the Envoy in front of vgw would: each request is
// carried through the Envoy-role client (envoytest), and its result
// written back. It is what a real SDK talks to in these measurements.
func (s *stack) front(t testing.TB) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		req := extproctest.Request{Method: r.Method, Path: r.URL.RequestURI(), Body: body}
		for k, vs := range r.Header {
			for _, v := range vs {
				req.Headers = append(req.Headers, extproctest.Header{Key: strings.ToLower(k), Value: v}) // as HTTP/2 carries them
			}
		}
		res, err := s.ExtProc.Do(r.Context(), req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		for _, h := range res.Headers {
			w.Header().Add(h.Key, h.Value)
		}
		w.WriteHeader(res.Status)
		w.Write(res.Body)
	})}
	go srv.Serve(lis)
	t.Cleanup(func() { srv.Close() })
	return "http://" + lis.Addr().String() + "/v1/"
}

// BenchmarkSDKBurst is issue 15's measurement of Retry-After with a real
// client: the official OpenAI Go SDK (its default 2 retries, honouring
// retry-after-ms) sends 10 chat completions at once to a model that
// serves one at a time (max_concurrent 1, max_queue 1), each taking 10 s,
// through an Envoy-role front to vgw and the sim runtime. It reports how
// many calls succeed, the burst's span (from the calls' start to the last
// success), and the share of it the model sat idle while turned-away
// clients waited. It runs once whatever -benchtime says (about 2 minutes).
func BenchmarkSDKBurst(b *testing.B) {
	const calls = 10
	s := startStack(b, `
runtime: {kind: sim}
min_resident: 0s
gpus: [{name: sim0, memory: 80GiB}]
models:
  slow:
    vram: 10GiB
    always_on: true
    max_concurrent: 1
    max_queue: 1
    sim: {tokens_per_second: 1}
`)
	poll.Until(b, "slow is ready", func() bool { return serving(s.mgr, "slow") })
	client := openai.NewClient(option.WithBaseURL(s.front(b)), option.WithAPIKey("sk-vgw-test"))

	// The model's in-flight count, sampled, for its idle time.
	type sample struct {
		at   time.Time
		busy bool
	}
	var mu sync.Mutex
	var samples []sample
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case now := <-tick.C:
				st, _ := s.app.ep.Stats("slow")
				mu.Lock()
				samples = append(samples, sample{now, st.InFlight > 0})
				mu.Unlock()
			}
		}
	}()

	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	ends := make([]time.Time, calls)
	errs := make([]error, calls)
	for i := range calls {
		wg.Go(func() {
			_, errs[i] = client.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
				Model:     "slow",
				Messages:  []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
				MaxTokens: openai.Int(10), // 10 s at 1 token a second
			})
			ends[i] = time.Now()
		})
	}
	wg.Wait()
	close(stop)
	<-sampled
	b.StopTimer()

	succeeded, last := 0, start
	for i, err := range errs {
		if err == nil {
			succeeded++
			if ends[i].After(last) {
				last = ends[i]
			}
		} else {
			b.Logf("call %d: %v", i, err)
		}
	}
	span := last.Sub(start)
	var idle time.Duration
	for i := 1; i < len(samples); i++ {
		if samples[i].at.After(last) {
			break
		}
		if !samples[i].busy {
			idle += samples[i].at.Sub(samples[i-1].at)
		}
	}
	b.ReportMetric(float64(succeeded), "succeeded/10")
	b.ReportMetric(span.Seconds(), "span-s")
	b.ReportMetric(100*idle.Seconds()/span.Seconds(), "idle-%")
	fmt.Printf("SDK burst: %d of %d calls succeeded; span %.1fs; model idle %.1fs (%.0f%%)\n", succeeded, calls, span.Seconds(), idle.Seconds(), 100*idle.Seconds()/span.Seconds())
}
