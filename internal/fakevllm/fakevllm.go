// Package fakevllm is a stand-in for a vLLM OpenAI server: the endpoints
// vgw and its clients use, the same shapes and status codes, a token rate
// instead of a GPU, and switches for the failures vgw must handle. It has
// no cgo, so it runs anywhere and in a FROM scratch image.
package fakevllm

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Options shape a fake server.
type Options struct {
	// Model is the served model name (vLLM's first --served-model-name):
	// the name its answers report.
	Model string
	// Aliases are the further names it answers to (vLLM's other
	// --served-model-names).
	Aliases []string
	// Adapters are its LoRA adapters, by name, with their sources
	// (vLLM's --lora-modules NAME=SOURCE).
	Adapters map[string]string
	// Root is what the server loads (vLLM's --model), reported as the
	// root of its base model names.
	Root string
	// StartupDelay is how long /health answers 503, as vLLM does while it
	// loads weights and profiles memory.
	StartupDelay time.Duration
	// ReadyOn, when set, holds the server loading after StartupDelay until
	// it is closed, and only then ready (or dead, with FailStart): a test
	// that needs a model still loading ends its load when it is done
	// looking, rather than racing a delay.
	ReadyOn <-chan struct{}
	// TokensPerSecond is the generation rate per request; 0 means instant.
	TokensPerSecond float64
	// MaxNumSeqs caps requests generating at once; more wait, as in vLLM's
	// scheduler. 0 means no cap.
	MaxNumSeqs int
	// FailStart makes the server exit with an error instead of becoming
	// ready, after StartupDelay.
	FailStart bool
	// CrashAfter makes the server die when its Nth request starts (0: never).
	CrashAfter int
	// CrashMidStream makes the server die in the middle of its Nth
	// response (0: never): a streamed one after its headers and half its
	// tokens, as when vLLM's engine dies while generating.
	CrashMidStream int
	// SlowHealth delays every /health answer.
	SlowHealth time.Duration
	// SleepMode is vLLM's --enable-sleep-mode, and DevMode its
	// VLLM_SERVER_DEV_MODE=1, without which the sleep endpoints do not
	// exist (sleep.go). SleepDelay is how long falling asleep takes, and
	// WakeDelay how long bringing the weights back does (from host memory
	// after level 1, or reload_weights after level 2).
	SleepMode, DevMode    bool
	SleepDelay, WakeDelay time.Duration
	// Log receives the server's log lines; nil discards them.
	Log *slog.Logger
	// Exit is called when the server must die (FailStart, CrashAfter,
	// CrashMidStream); the
	// command exits the process, tests observe.
	Exit func(code int)
}

// Server is one fake vLLM.
type Server struct {
	opt     Options
	start   time.Time
	ready   atomic.Bool
	started atomic.Int64 // requests started
	running atomic.Int64
	waiting atomic.Int64
	seqs    chan struct{} // generation slots, when MaxNumSeqs > 0
	once    sync.Once
	sleeper sleeper
}

// New returns a server; its startup clock runs from now.
func New(opt Options) *Server {
	if opt.Log == nil {
		opt.Log = slog.New(slog.DiscardHandler)
	}
	if opt.Exit == nil {
		opt.Exit = func(int) {}
	}
	s := &Server{opt: opt, start: time.Now(), sleeper: sleeper{weights: weightsLoaded, kvCache: true}}
	if opt.MaxNumSeqs > 0 {
		s.seqs = make(chan struct{}, opt.MaxNumSeqs)
	}
	return s
}

// Serve serves HTTP on lis until ctx ends. It marks the server ready once
// the startup delay has passed (and ReadyOn is closed, if set), or dies
// then if told to fail.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	s.opt.Log.Info("starting vLLM API server", "model", s.opt.Model, "addr", lis.Addr().String())
	go func() {
		// The startup delay passes as vLLM's cold start does, each phase
		// logged as vLLM logs it (manager/runtime/vllm.ParseProgress). A
		// start that fails fails in memory profiling, as vLLM's out of
		// memory does: it logs nothing past it. A start with no delay
		// logs none of it.
		steps := startupSteps()
		if s.opt.StartupDelay <= 0 {
			steps = nil
		}
		for _, step := range steps {
			select {
			case <-time.After(time.Until(s.start.Add(time.Duration(step.at * float64(s.opt.StartupDelay))))):
			case <-ctx.Done():
				return
			}
			if !s.opt.FailStart || step.at < profilingAt {
				s.opt.Log.Info(step.line)
			}
		}
		if s.opt.ReadyOn != nil {
			select {
			case <-s.opt.ReadyOn:
			case <-ctx.Done():
				return
			}
		}
		if s.opt.FailStart {
			s.opt.Log.Error("Error in memory profiling: CUDA out of memory. Tried to allocate 2.00 GiB")
			s.die(1)
			return
		}
		s.ready.Store(true)
		s.opt.Log.Info("Application startup complete.")
	}()
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(shutdown)
	}()
	if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// profilingAt is when, in a fraction of the startup delay, memory
// profiling ends.
const profilingAt = 0.65

// startupStep is a line vLLM logs as it starts, and when: a fraction of
// the startup delay.
type startupStep struct {
	at   float64
	line string
}

// startupSteps are the lines of a vLLM 0.11 cold start: weights in four
// shards, torch.compile, the KV cache, 67 CUDA graphs.
func startupSteps() []startupStep {
	steps := []startupStep{{0, "Starting to load model"}}
	for i := range 5 {
		steps = append(steps, startupStep{0.4 * float64(i) / 4, fmt.Sprintf("Loading safetensors checkpoint shards: %3d%% Completed | %d/4", 25*i, i)})
	}
	steps = append(steps,
		startupStep{0.4, "Loading weights took 0.40 seconds"},
		startupStep{0.45, "Dynamo bytecode transform time: 0.05 s"},
		startupStep{0.6, "torch.compile takes 0.20 s in total"},
		startupStep{profilingAt, "Available KV cache memory: 10.00 GiB"})
	for n := 0; n <= 67; n += 10 {
		steps = append(steps, startupStep{0.7 + 0.3*float64(n)/67, fmt.Sprintf("Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): %3d%%| | %d/67", 100*n/67, n)})
	}
	return append(steps, startupStep{1, "Graph capturing finished in 0 secs"})
}

func (s *Server) die(code int) { s.once.Do(func() { s.opt.Exit(code) }) }

// Ready reports whether /health answers 200.
func (s *Server) Ready() bool { return s.ready.Load() }

// Handler serves vLLM's OpenAI endpoints.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", s.health)
	mux.HandleFunc("GET /v1/models", s.models)
	mux.HandleFunc("POST /v1/chat/completions", func(w http.ResponseWriter, r *http.Request) { s.complete(w, r, true) })
	mux.HandleFunc("POST /v1/completions", func(w http.ResponseWriter, r *http.Request) { s.complete(w, r, false) })
	mux.HandleFunc("POST /v1/embeddings", s.embeddings)
	mux.HandleFunc("POST /v1/audio/transcriptions", s.transcribe)
	mux.HandleFunc("POST /v1/audio/translations", s.transcribe)
	mux.HandleFunc("GET /metrics", s.metrics)
	s.sleepHandlers(mux)
	return mux
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	if s.opt.SlowHealth > 0 {
		select {
		case <-time.After(s.opt.SlowHealth):
		case <-r.Context().Done():
			return
		}
	}
	if !s.ready.Load() {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// models lists what the server answers to as vLLM does
// (serving_models.py show_available_models): a card per served name,
// rooted at what it loads, then one per LoRA adapter, rooted at its
// source, whose parent is the first served name.
func (s *Server) models(w http.ResponseWriter, _ *http.Request) {
	root := cmp.Or(s.opt.Root, s.opt.Model)
	var data []any
	for _, name := range append([]string{s.opt.Model}, s.opt.Aliases...) {
		data = append(data, map[string]any{"id": name, "object": "model", "created": s.start.Unix(), "owned_by": "vllm", "root": root, "parent": nil})
	}
	for _, name := range slices.Sorted(maps.Keys(s.opt.Adapters)) {
		data = append(data, map[string]any{"id": name, "object": "model", "created": s.start.Unix(), "owned_by": "vllm", "root": s.opt.Adapters[name], "parent": s.opt.Model})
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data})
}

// servedAs returns the name an answer to a request for model reports,
// as vLLM's does (the first served name for the base model, the
// adapter's own name for an adapter), and false when the server does
// not serve model. vLLM takes a request that names no model as one for
// the base model.
func (s *Server) servedAs(model string) (string, bool) {
	if model == "" || model == s.opt.Model || slices.Contains(s.opt.Aliases, model) {
		return s.opt.Model, true
	}
	if _, ok := s.opt.Adapters[model]; ok {
		return model, true
	}
	return "", false
}

func (s *Server) metrics(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	label := `{model_name="` + strings.ReplaceAll(s.opt.Model, `"`, `\"`) + `"}`
	fmt.Fprintf(w, "# HELP vllm:num_requests_running Number of requests currently running on GPU.\n# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running%s %d\n", label, s.running.Load())
	fmt.Fprintf(w, "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting%s %d\n", label, s.waiting.Load())
}

// request is the part of an OpenAI completion request the fake reads.
type request struct {
	Model         string `json:"model"`
	MaxTokens     *int   `json:"max_tokens"`
	Stream        bool   `json:"stream"`
	StreamOptions *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
}

// vllmError writes an error the way vLLM's OpenAI server does.
func vllmError(w http.ResponseWriter, status int, typ, msg string) {
	writeJSON(w, status, map[string]any{"object": "error", "message": msg, "type": typ, "param": nil, "code": status})
}

func (s *Server) complete(w http.ResponseWriter, r *http.Request, chat bool) {
	var req request
	served, ok := s.accept(w, r, &req, &req.Model)
	if !ok {
		return
	}
	n := s.started.Add(1)
	if s.opt.CrashAfter > 0 && n >= int64(s.opt.CrashAfter) {
		s.crash(n)
	}
	if s.seqs != nil {
		s.waiting.Add(1)
		select {
		case s.seqs <- struct{}{}:
			s.waiting.Add(-1)
		case <-r.Context().Done():
			s.waiting.Add(-1)
			return
		}
		defer func() { <-s.seqs }()
	}
	s.running.Add(1)
	defer s.running.Add(-1)

	tokens := 16
	if req.MaxTokens != nil && *req.MaxTokens > 0 {
		tokens = *req.MaxTokens
	}
	word := "token"
	if _, sense := s.sleeper.awake(); !sense {
		word = "#####"
	}
	g := &generation{s: s, word: word, model: served, chat: chat, id: "cmpl-" + strconv.FormatInt(time.Now().UnixNano(), 36), tokens: tokens, crashAt: -1}
	if s.opt.CrashMidStream > 0 && n == int64(s.opt.CrashMidStream) {
		g.crashAt = tokens / 2
	}
	if req.Stream {
		g.stream(w, r, req.StreamOptions != nil && req.StreamOptions.IncludeUsage)
		return
	}
	if g.crashAt >= 0 {
		g.wait(r.Context(), g.crashAt)
		s.crash(n)
	}
	if !g.wait(r.Context(), tokens) {
		return
	}
	writeJSON(w, http.StatusOK, g.final())
}

// embeddings answers an embedding request as vLLM does: one vector of
// four numbers per input.
func (s *Server) embeddings(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Model string `json:"model"`
		Input any    `json:"input"`
	}
	served, ok := s.accept(w, r, &req, &req.Model)
	if !ok {
		return
	}
	n := 1
	if inputs, ok := req.Input.([]any); ok {
		n = len(inputs)
	}
	data := make([]any, n)
	for i := range data {
		data[i] = map[string]any{"object": "embedding", "index": i, "embedding": []float64{0.1, 0.2, 0.3, 0.4}}
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "model": served, "data": data,
		"usage": map[string]int{"prompt_tokens": 8 * n, "total_tokens": 8 * n}})
}

// transcribe answers a Whisper upload as vLLM does: multipart form data
// with the audio file and the model, answered {"text": ...}; the text
// says how many bytes of audio came.
func (s *Server) transcribe(w http.ResponseWriter, r *http.Request) {
	if !s.serving(w) {
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 64<<20)
	if err := r.ParseMultipartForm(32 << 20); err != nil {
		vllmError(w, http.StatusBadRequest, "BadRequestError", "invalid form: "+err.Error())
		return
	}
	defer r.MultipartForm.RemoveAll()
	if _, ok := s.servedAs(r.FormValue("model")); !ok {
		vllmError(w, http.StatusNotFound, "NotFoundError", "The model `"+r.FormValue("model")+"` does not exist.")
		return
	}
	f, h, err := r.FormFile("file")
	if err != nil {
		vllmError(w, http.StatusBadRequest, "BadRequestError", "no audio file: "+err.Error())
		return
	}
	f.Close()
	writeJSON(w, http.StatusOK, map[string]any{"text": fmt.Sprintf("heard %d bytes", h.Size)})
}

// serving answers 503 for a server that cannot serve: still loading, or
// asleep.
func (s *Server) serving(w http.ResponseWriter) bool {
	if !s.ready.Load() {
		vllmError(w, http.StatusServiceUnavailable, "ServiceUnavailableError", "The server is not ready yet.")
		return false
	}
	if awake, _ := s.sleeper.awake(); !awake {
		vllmError(w, http.StatusServiceUnavailable, "ServiceUnavailableError", "The engine is sleeping.")
		return false
	}
	return true
}

// accept reads a JSON request into req as vLLM does, answering what it
// refuses: 503 while loading, 400 for a body that is not JSON, 404 for a
// model (*model, once read) it does not serve. It returns the name the
// answer reports.
func (s *Server) accept(w http.ResponseWriter, r *http.Request, req any, model *string) (string, bool) {
	if !s.serving(w) {
		return "", false
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<20)).Decode(req); err != nil {
		vllmError(w, http.StatusBadRequest, "BadRequestError", "invalid JSON: "+err.Error())
		return "", false
	}
	served, ok := s.servedAs(*model)
	if !ok {
		vllmError(w, http.StatusNotFound, "NotFoundError", "The model `"+*model+"` does not exist.")
	}
	return served, ok
}

// crash kills the server while it serves its nth request.
func (s *Server) crash(n int64) {
	s.opt.Log.Error("engine core died unexpectedly", "requests", n)
	s.die(1)
	panic(http.ErrAbortHandler) // cut this connection, as a dead process would
}

// generation is one request's output: the word "token", tokens times
// (or "#####" from weights woken empty and never reloaded).
type generation struct {
	s       *Server
	word    string
	model   string // the name the answer reports
	chat    bool
	id      string
	tokens  int
	crashAt int // the token before which the server dies; -1: never
}

// wait spends the time n tokens take at the configured rate.
func (g *generation) wait(ctx context.Context, n int) bool {
	if g.s.opt.TokensPerSecond <= 0 {
		return ctx.Err() == nil
	}
	return pause(ctx, time.Duration(float64(n)/g.s.opt.TokensPerSecond*float64(time.Second)))
}

// pause spends d unless ctx ends first, and reports whether it did.
func pause(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func (g *generation) object() string {
	if g.chat {
		return "chat.completion"
	}
	return "text_completion"
}

func (g *generation) usage() map[string]int {
	return map[string]int{"prompt_tokens": 8, "completion_tokens": g.tokens, "total_tokens": 8 + g.tokens}
}

func (g *generation) final() map[string]any {
	text := strings.TrimSpace(strings.Repeat(g.word+" ", g.tokens))
	choice := map[string]any{"index": 0, "finish_reason": "length"}
	if g.chat {
		choice["message"] = map[string]any{"role": "assistant", "content": text}
	} else {
		choice["text"] = text
	}
	return map[string]any{"id": g.id, "object": g.object(), "created": time.Now().Unix(), "model": g.model,
		"choices": []any{choice}, "usage": g.usage()}
}

// stream sends one SSE event per token, then the finish, the usage if
// asked, and [DONE], as vLLM does.
func (g *generation) stream(w http.ResponseWriter, r *http.Request, includeUsage bool) {
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	object := g.object() + ".chunk"
	if !g.chat {
		object = "text_completion"
	}
	event := func(choice map[string]any, usage map[string]int) bool {
		chunk := map[string]any{"id": g.id, "object": object, "created": time.Now().Unix(), "model": g.model, "choices": []any{}}
		if choice != nil {
			chunk["choices"] = []any{choice}
		}
		if usage != nil {
			chunk["usage"] = usage
		}
		b, _ := json.Marshal(chunk)
		if _, err := fmt.Fprintf(w, "data: %s\n\n", b); err != nil {
			return false
		}
		if flusher != nil {
			flusher.Flush()
		}
		return true
	}
	piece := func(text string, finish any) map[string]any {
		c := map[string]any{"index": 0, "finish_reason": finish}
		if g.chat {
			c["delta"] = map[string]any{"content": text}
		} else {
			c["text"] = text
		}
		return c
	}
	for i := range g.tokens {
		if i == g.crashAt {
			g.s.crash(g.s.started.Load())
		}
		if !g.wait(r.Context(), 1) {
			return
		}
		text := g.word
		if i > 0 {
			text = " " + g.word
		}
		if !event(piece(text, nil), nil) {
			return
		}
	}
	if !event(piece("", "length"), nil) {
		return
	}
	if includeUsage && !event(nil, g.usage()) {
		return
	}
	fmt.Fprint(w, "data: [DONE]\n\n")
	if flusher != nil {
		flusher.Flush()
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}
