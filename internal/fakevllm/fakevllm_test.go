package fakevllm

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"io"
	"log/slog"
	"mime/multipart"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vgw-project/vgw/manager/runtime/vllm"
)

// serve runs a fake on a loopback port and returns its base URL.
func serve(t *testing.T, opt Options) (*Server, string) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := New(opt)
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, lis) }()
	t.Cleanup(func() { cancel(); <-done })
	return s, "http://" + lis.Addr().String()
}

// long bounds a wait for what must happen: only a hang reaches it,
// however slow the machine.
const long = time.Minute

func waitReady(t *testing.T, url string) {
	t.Helper()
	deadline := time.Now().Add(long)
	for time.Now().Before(deadline) {
		if health(t, url) == 200 {
			return
		}
		time.Sleep(2 * time.Millisecond) // polling interval
	}
	t.Fatal("never became ready")
}

// health is the status GET /health answers, 0 for no answer.
func health(t *testing.T, url string) int {
	t.Helper()
	resp, err := http.Get(url + "/health")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

func post(t *testing.T, url, body string) *http.Response {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// TestHealthFollowsStartup: while the server loads (its startup delay
// or, when it has one, until ReadyOn is closed) /health and completions
// answer 503; once loaded, 200.
func TestHealthFollowsStartup(t *testing.T) {
	tests := []struct {
		name   string
		opt    Options
		loaded bool // ready once serving, after the polls it takes
	}{
		{"within its startup delay", Options{Model: "m", StartupDelay: time.Hour}, false},
		{"held for ReadyOn", Options{Model: "m", ReadyOn: make(chan struct{})}, false},
		{"no startup delay", Options{Model: "m"}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, url := serve(t, tt.opt)
			want := 503
			if tt.loaded {
				waitReady(t, url)
				want = 200
			}
			if code := health(t, url); code != want {
				t.Fatalf("health: %d, want %d", code, want)
			}
			if r := post(t, url+"/v1/completions", `{"model":"m"}`); r.StatusCode != want {
				t.Fatalf("completion: %d, want %d", r.StatusCode, want)
			}
		})
	}
}

// TestReadyOn: a server held by ReadyOn becomes ready once it is closed.
func TestReadyOn(t *testing.T) {
	ready := make(chan struct{})
	_, url := serve(t, Options{Model: "m", ReadyOn: ready})
	if code := health(t, url); code != 503 {
		t.Fatalf("health before ReadyOn: %d, want 503", code)
	}
	close(ready)
	waitReady(t, url)
}

func TestCompletions(t *testing.T) {
	_, url := serve(t, Options{Model: "m"})
	waitReady(t, url)

	var chat struct {
		Object  string `json:"object"`
		Model   string `json:"model"`
		Choices []struct {
			Message struct{ Content string } `json:"message"`
		} `json:"choices"`
		Usage struct {
			CompletionTokens int `json:"completion_tokens"`
		} `json:"usage"`
	}
	r := post(t, url+"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3}`)
	if err := json.NewDecoder(r.Body).Decode(&chat); err != nil || r.StatusCode != 200 {
		t.Fatalf("chat: %d %v", r.StatusCode, err)
	}
	if chat.Object != "chat.completion" || chat.Choices[0].Message.Content != "token token token" || chat.Usage.CompletionTokens != 3 {
		t.Fatalf("chat answer %+v", chat)
	}

	r = post(t, url+"/v1/completions", `{"model":"other"}`)
	var e struct {
		Object string `json:"object"`
		Code   int    `json:"code"`
	}
	json.NewDecoder(r.Body).Decode(&e)
	if r.StatusCode != 404 || e.Object != "error" || e.Code != 404 {
		t.Fatalf("wrong model: %d %+v", r.StatusCode, e)
	}

	resp, err := http.Get(url + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if !bytes.Contains(b, []byte(`"id":"m"`)) {
		t.Fatalf("models: %s", b)
	}
}

func TestStream(t *testing.T) {
	_, url := serve(t, Options{Model: "m", TokensPerSecond: 1000})
	waitReady(t, url)
	r := post(t, url+"/v1/chat/completions", `{"model":"m","stream":true,"max_tokens":4,"stream_options":{"include_usage":true}}`)
	if ct := r.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("content-type %q", ct)
	}
	var events []string
	sc := bufio.NewScanner(r.Body)
	for sc.Scan() {
		if line, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			events = append(events, line)
		}
	}
	// 4 tokens, the finish, the usage, [DONE].
	if len(events) != 7 || events[6] != "[DONE]" || !strings.Contains(events[4], `"finish_reason":"length"`) || !strings.Contains(events[5], `"completion_tokens":4`) {
		t.Fatalf("events %q", events)
	}
	var text strings.Builder
	for _, e := range events[:4] {
		var c struct {
			Choices []struct {
				Delta struct{ Content string } `json:"delta"`
			} `json:"choices"`
		}
		json.Unmarshal([]byte(e), &c)
		text.WriteString(c.Choices[0].Delta.Content)
	}
	if text.String() != "token token token token" {
		t.Fatalf("streamed text %q", text.String())
	}
}

// TestMetricsAndQueueing: with one sequence at a time, a second request
// waits while the first generates, and the metrics say so. Both are
// endless (a billion tokens) and cancelled at the end, so they overlap
// however slowly they are sent.
func TestMetricsAndQueueing(t *testing.T) {
	s, url := serve(t, Options{Model: "m", MaxNumSeqs: 1, TokensPerSecond: 20})
	waitReady(t, url)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	for range 2 {
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url+"/v1/completions", strings.NewReader(`{"model":"m","max_tokens":1000000000}`))
			if r, err := http.DefaultClient.Do(req); err == nil {
				r.Body.Close()
				t.Errorf("an endless request ended: %d", r.StatusCode)
			}
		})
	}
	deadline := time.Now().Add(long)
	for s.running.Load() != 1 || s.waiting.Load() != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("running %d waiting %d, want 1 and 1", s.running.Load(), s.waiting.Load())
		}
		time.Sleep(time.Millisecond) // polling interval
	}
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, want := range []string{`vllm:num_requests_running{model_name="m"} 1`, `vllm:num_requests_waiting{model_name="m"} 1`} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("metrics lack %q:\n%s", want, b)
		}
	}
}

func TestFaults(t *testing.T) {
	t.Run("fail start", func(t *testing.T) {
		exited := make(chan int, 1)
		_, url := serve(t, Options{Model: "m", StartupDelay: 10 * time.Millisecond, FailStart: true, Exit: func(c int) { exited <- c }})
		if code := <-exited; code != 1 {
			t.Fatalf("exit %d", code)
		}
		resp, err := http.Get(url + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				t.Fatal("a failed start became healthy")
			}
		}
	})
	t.Run("crash after", func(t *testing.T) {
		exited := make(chan int, 1)
		_, url := serve(t, Options{Model: "m", CrashAfter: 2, Exit: func(c int) { exited <- c }})
		waitReady(t, url)
		if r := post(t, url+"/v1/completions", `{"model":"m"}`); r.StatusCode != 200 {
			t.Fatalf("first request: %d", r.StatusCode)
		}
		if _, err := http.Post(url+"/v1/completions", "application/json", strings.NewReader(`{"model":"m"}`)); err == nil {
			t.Fatal("the crashing request got an answer")
		}
		if code := <-exited; code != 1 {
			t.Fatalf("exit %d", code)
		}
	})
}

func TestMainFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		says string
	}{
		{"no model", []string{"--port", "0"}, "--model is required"},
		{"a signal that means something else", []string{"--model", "m", "--port", "0", "--ready-on-signal", "TERM"}, `--ready-on-signal: "TERM"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			if code := Main(tt.args, &out, &errOut); code != 2 || !strings.Contains(errOut.String(), tt.says) {
				t.Fatalf("exit %d: %s; want 2, saying %s", code, errOut.String(), tt.says)
			}
		})
	}
}

// TestVLLMCommandLine: the fake takes vLLM's command line, ignoring the
// flags it does not know (with their values), and its own settings from
// the environment, as a container gets them.
func TestVLLMCommandLine(t *testing.T) {
	t.Setenv("FAKEVLLM_STARTUP_DELAY", "5s")
	t.Setenv("FAKEVLLM_FAIL_START", "true")
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	model := fs.String("model", "", "")
	port := fs.Int("port", 0, "")
	delay := fs.Duration("startup-delay", 0, "")
	fail := fs.Bool("fail-start", false, "")
	if err := fromEnv(fs); err != nil {
		t.Fatal(err)
	}
	ignored, err := parseLenient(fs, []string{"--model", "org/m", "--enforce-eager", "--trust-remote-code",
		"--port", "9", "--kv-cache-dtype", "fp8", "--foo=bar"})
	if err != nil {
		t.Fatal(err)
	}
	if *model != "org/m" || *port != 9 || *delay != 5*time.Second || !*fail {
		t.Errorf("model %q port %d delay %v fail %v", *model, *port, *delay, *fail)
	}
	want := []string{"--enforce-eager", "--trust-remote-code", "--kv-cache-dtype", "fp8", "--foo=bar"}
	if !slices.Equal(ignored, want) {
		t.Errorf("ignored %q, want %q", ignored, want)
	}
	t.Setenv("FAKEVLLM_PORT", "eighty")
	if err := fromEnv(fs); err == nil || !strings.Contains(err.Error(), "FAKEVLLM_PORT") {
		t.Errorf("a bad env value: %v", err)
	}
	if _, err := parseLenient(fs, []string{"--port", "x"}); err == nil {
		t.Error("a bad value of a known flag was ignored")
	}
}

// TestTakeLists: vLLM's list flags take every value up to the next flag,
// before or after "--", and in --name=value form.
func TestTakeLists(t *testing.T) {
	args := []string{"--model", "k", "--", "--model", "org/m", "--served-model-name", "k", "gpt", "org/m",
		"--enable-lora", "--lora-modules", "sql=/l/sql", "b=org/b", "--max-loras", "2"}
	rest, lists := takeLists(args, "--served-model-name", "--lora-modules")
	if want := []string{"--model", "k", "--", "--model", "org/m", "--enable-lora", "--max-loras", "2"}; !slices.Equal(rest, want) {
		t.Errorf("rest %q, want %q", rest, want)
	}
	if got := lists["--served-model-name"]; !slices.Equal(got, []string{"k", "gpt", "org/m"}) {
		t.Errorf("served names %q", got)
	}
	if got := lists["--lora-modules"]; !slices.Equal(got, []string{"sql=/l/sql", "b=org/b"}) {
		t.Errorf("lora modules %q", got)
	}
	_, lists = takeLists([]string{"--served-model-name=a", "b"}, "--served-model-name")
	if got := lists["--served-model-name"]; !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("--name=value form: %q", got)
	}
}

// TestServedNames: the fake answers to each served name and adapter as
// vLLM does: the base model's answers report its first name, an
// adapter's its own, and /v1/models lists them all, adapters with their
// parent.
func TestServedNames(t *testing.T) {
	_, url := serve(t, Options{Model: "k", Aliases: []string{"gpt", "org/m"}, Root: "org/m", Adapters: map[string]string{"sql": "/l/sql"}})
	waitReady(t, url)
	for _, tt := range []struct{ ask, reports string }{{"k", "k"}, {"gpt", "k"}, {"org/m", "k"}, {"", "k"}, {"sql", "sql"}} {
		var got struct {
			Model string `json:"model"`
		}
		r := post(t, url+"/v1/completions", `{"model":"`+tt.ask+`","max_tokens":1}`)
		if err := json.NewDecoder(r.Body).Decode(&got); err != nil || r.StatusCode != 200 || got.Model != tt.reports {
			t.Errorf("asked for %q: %d %v, reports %q, want %q", tt.ask, r.StatusCode, err, got.Model, tt.reports)
		}
	}
	if r := post(t, url+"/v1/completions", `{"model":"other"}`); r.StatusCode != 404 {
		t.Errorf("a name it does not serve: %d", r.StatusCode)
	}
	resp, err := http.Get(url + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var list struct {
		Data []struct {
			ID     string  `json:"id"`
			Root   string  `json:"root"`
			Parent *string `json:"parent"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range list.Data {
		parent := "-"
		if m.Parent != nil {
			parent = *m.Parent
		}
		got = append(got, m.ID+"<"+m.Root+"<"+parent)
	}
	if want := []string{"k<org/m<-", "gpt<org/m<-", "org/m<org/m<-", "sql</l/sql<k"}; !slices.Equal(got, want) {
		t.Errorf("models %q, want %q", got, want)
	}
}

// TestEmbeddingsAndTranscriptions: the fake answers embeddings, and
// Whisper uploads (multipart form data) to a name it serves.
func TestEmbeddingsAndTranscriptions(t *testing.T) {
	_, url := serve(t, Options{Model: "m", Aliases: []string{"whisper-1"}})
	waitReady(t, url)
	var emb struct {
		Model string `json:"model"`
		Data  []struct {
			Embedding []float64 `json:"embedding"`
		} `json:"data"`
	}
	r := post(t, url+"/v1/embeddings", `{"model":"whisper-1","input":["a","b"]}`)
	if err := json.NewDecoder(r.Body).Decode(&emb); err != nil || r.StatusCode != 200 || emb.Model != "m" || len(emb.Data) != 2 {
		t.Fatalf("embeddings: %d %v %+v", r.StatusCode, err, emb)
	}
	for _, tc := range []struct {
		model  string
		status int
	}{{"whisper-1", 200}, {"other", 404}} {
		var b bytes.Buffer
		w := multipart.NewWriter(&b)
		fw, _ := w.CreateFormFile("file", "a.mp3")
		fw.Write(make([]byte, 1000))
		w.WriteField("model", tc.model)
		w.Close()
		resp, err := http.Post(url+"/v1/audio/transcriptions", w.FormDataContentType(), &b)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status || tc.status == 200 && string(body) != "{\"text\":\"heard 1000 bytes\"}\n" {
			t.Errorf("%s: %d %s, want %d", tc.model, resp.StatusCode, body, tc.status)
		}
	}
}

// TestStartupProgress: the fake logs its start as vLLM does, each phase
// in order, and vgw's reader of vLLM's log follows it to ready.
func TestStartupProgress(t *testing.T) {
	var mu sync.Mutex
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return buf.Write(p) }), nil))
	_, url := serve(t, Options{Model: "m", StartupDelay: 50 * time.Millisecond, Log: log})
	waitReady(t, url)
	mu.Lock()
	lines := strings.Split(buf.String(), "\n")
	mu.Unlock()
	var phases []vllm.Phase
	last := vllm.Progress{Percent: -1}
	for _, l := range lines {
		p, ok := vllm.ParseProgress(l)
		if !ok {
			continue
		}
		if p.Phase < last.Phase || p.Phase == last.Phase && p.Percent < last.Percent {
			t.Errorf("%v after %v: %q", p, last, l)
		}
		if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
			phases = append(phases, p.Phase)
		}
		last = p
	}
	want := []vllm.Phase{vllm.PhaseLoading, vllm.PhaseCompiling, vllm.PhaseProfiling, vllm.PhaseCapturing, vllm.PhaseReady}
	if !slices.Equal(phases, want) {
		t.Errorf("phases %v, want %v", phases, want)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
