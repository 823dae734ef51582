package fakevllm

import (
	"encoding/json"
	"net/http"
	"sync"
)

// Sleep mode, as vLLM serves it (docs/features/sleep_mode.md): with
// --enable-sleep-mode, and its development endpoints on
// (VLLM_SERVER_DEV_MODE=1),
//
//   - POST /sleep?level=1 moves the weights to host memory and drops the
//     KV cache; level=2 drops both;
//   - POST /wake_up wakes all of it, or only ?tags=weights or
//     ?tags=kv_cache; after level 2 the weights come back empty, and
//     POST /collective_rpc {"method":"reload_weights"} loads them again;
//   - POST /reset_prefix_cache clears the prefix cache;
//   - GET /is_sleeping answers {"is_sleeping": bool}.
//
// The fake keeps the same states and takes the configured time for each
// step. It answers inference while asleep with 503, and one after a level
// 2 wake that skipped reload_weights with nonsense, so that a manager
// that gets the sequence wrong is seen to. Sleeping with requests in
// flight kills it, as it has killed vLLM (vllm#28714).

// weights is where a sleeping server's weights are.
type weights uint8

const (
	weightsLoaded    weights = iota // on the GPU, usable
	weightsOffloaded                // in host memory (level 1)
	weightsDropped                  // gone (level 2)
	weightsEmpty                    // on the GPU again, not yet reloaded
)

// sleeper is a fake server's sleep state.
type sleeper struct {
	mu      sync.Mutex
	weights weights
	kvCache bool // allocated
}

// awake reports whether the server can serve, and whether what it serves
// is sense (the weights reloaded after a level-2 sleep).
func (z *sleeper) awake() (serving, sense bool) {
	z.mu.Lock()
	defer z.mu.Unlock()
	serving = z.kvCache && (z.weights == weightsLoaded || z.weights == weightsEmpty)
	return serving, z.weights == weightsLoaded
}

// sleeping is what /is_sleeping says: anything still asleep. Weights
// woken empty are awake to vLLM, which cannot tell they were never
// reloaded.
func (z *sleeper) sleeping() bool {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.weights == weightsOffloaded || z.weights == weightsDropped || !z.kvCache
}

func (s *Server) sleepHandlers(mux *http.ServeMux) {
	if !s.opt.DevMode {
		return // vLLM registers them only in development mode
	}
	mux.HandleFunc("POST /sleep", s.sleep)
	mux.HandleFunc("POST /wake_up", s.wakeUp)
	mux.HandleFunc("GET /is_sleeping", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]bool{"is_sleeping": s.sleeper.sleeping()})
	})
	mux.HandleFunc("POST /collective_rpc", s.collectiveRPC)
	mux.HandleFunc("POST /reset_prefix_cache", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) })
}

func (s *Server) sleep(w http.ResponseWriter, r *http.Request) {
	if !s.opt.SleepMode {
		vllmError(w, http.StatusInternalServerError, "InternalServerError", "Sleep mode is not enabled. Please compile vLLM with --enable-sleep-mode.")
		return
	}
	level := r.URL.Query().Get("level")
	if level == "" {
		level = "1"
	}
	if level != "1" && level != "2" {
		vllmError(w, http.StatusBadRequest, "BadRequestError", "level must be 1 or 2")
		return
	}
	if n := s.running.Load() + s.waiting.Load(); n > 0 {
		s.opt.Log.Error("engine core died unexpectedly: sleep with requests in flight", "requests", n)
		s.die(1)
		panic(http.ErrAbortHandler)
	}
	if !pause(r.Context(), s.opt.SleepDelay) {
		return
	}
	s.sleeper.mu.Lock()
	s.sleeper.kvCache = false
	if level == "1" && s.sleeper.weights == weightsLoaded {
		s.sleeper.weights = weightsOffloaded
	} else if level == "2" {
		s.sleeper.weights = weightsDropped
	}
	s.sleeper.mu.Unlock()
	s.opt.Log.Info("It took to fall asleep", "level", level, "seconds", s.opt.SleepDelay.Seconds())
	w.WriteHeader(http.StatusOK)
}

func (s *Server) wakeUp(w http.ResponseWriter, r *http.Request) {
	tags := r.URL.Query()["tags"]
	all := len(tags) == 0
	want := func(tag string) bool {
		for _, t := range tags {
			if t == tag {
				return true
			}
		}
		return all
	}
	s.sleeper.mu.Lock()
	offloaded := s.sleeper.weights == weightsOffloaded
	s.sleeper.mu.Unlock()
	// Bringing level-1 weights back from host memory is the slow part.
	if want("weights") && offloaded && !pause(r.Context(), s.opt.WakeDelay) {
		return
	}
	s.sleeper.mu.Lock()
	if want("weights") {
		switch s.sleeper.weights {
		case weightsOffloaded:
			s.sleeper.weights = weightsLoaded
		case weightsDropped:
			s.sleeper.weights = weightsEmpty
		}
	}
	if want("kv_cache") {
		s.sleeper.kvCache = true
	}
	s.sleeper.mu.Unlock()
	w.WriteHeader(http.StatusOK)
}

// collectiveRPC runs a method on every worker; the fake knows
// reload_weights, which loads the weights of a level-2 sleeper again.
func (s *Server) collectiveRPC(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Method string `json:"method"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&req); err != nil || req.Method != "reload_weights" {
		vllmError(w, http.StatusBadRequest, "BadRequestError", "unsupported collective_rpc method")
		return
	}
	if !pause(r.Context(), s.opt.WakeDelay) {
		return
	}
	s.sleeper.mu.Lock()
	if s.sleeper.weights == weightsEmpty {
		s.sleeper.weights = weightsLoaded
	}
	s.sleeper.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{"results": []any{nil}})
}
