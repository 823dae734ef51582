package vllm

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// vLLM's sleep mode (docs/features/sleep_mode.md; vllm/entrypoints/
// openai/api_server.py), which a server started with --enable-sleep-mode
// and VLLM_SERVER_DEV_MODE=1 serves: the runtimes that run vLLM, or a
// stand-in that serves the same endpoints, put servers to sleep and wake
// them through these. None of the endpoints is under /v1, so vLLM's
// --api-key does not guard them (its AuthenticationMiddleware checks
// only /v1 paths); Envoy keeps clients from them.

// Sleep puts the server at addr to sleep at level (1 or 2) and checks
// that it sleeps. It must have no request in flight: sleeping under load
// has killed vLLM's engine (vllm#28714).
func Sleep(ctx context.Context, c *http.Client, addr string, level int) error {
	if level != 1 && level != 2 {
		return fmt.Errorf("sleep %s: level %d is not 1 or 2", addr, level)
	}
	if err := post(ctx, c, addr, fmt.Sprintf("/sleep?level=%d", level), nil); err != nil {
		return err
	}
	asleep, err := IsSleeping(ctx, c, addr)
	switch {
	case err != nil:
		return err
	case !asleep:
		return fmt.Errorf("sleep %s: POST /sleep answered 200, but /is_sleeping says it is awake", addr)
	}
	return nil
}

// Wake wakes a server that sleeps at level and checks that it is awake.
// Level 1 is one call, which brings the weights back from host memory
// and allocates the KV cache. Level 2 dropped the weights, so vLLM's
// sequence for it: allocate the weights' memory, reload them from disk,
// allocate the KV cache, and clear the prefix cache, which holds entries
// computed by weights that are gone.
func Wake(ctx context.Context, c *http.Client, addr string, level int) error {
	type step struct{ path, body string }
	var steps []step
	switch level {
	case 1:
		steps = []step{{"/wake_up", ""}}
	case 2:
		steps = []step{
			{"/wake_up?tags=weights", ""},
			{"/collective_rpc", `{"method":"reload_weights"}`},
			{"/wake_up?tags=kv_cache", ""},
			{"/reset_prefix_cache", ""},
		}
	default:
		return fmt.Errorf("wake %s: level %d is not 1 or 2", addr, level)
	}
	for _, s := range steps {
		var body []byte
		if s.body != "" {
			body = []byte(s.body)
		}
		if err := post(ctx, c, addr, s.path, body); err != nil {
			return err
		}
	}
	asleep, err := IsSleeping(ctx, c, addr)
	switch {
	case err != nil:
		return err
	case asleep:
		return fmt.Errorf("wake %s: the wake-up answered 200, but /is_sleeping says it still sleeps", addr)
	}
	return nil
}

// IsSleeping asks the server at addr whether it sleeps.
func IsSleeping(ctx context.Context, c *http.Client, addr string) (bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/is_sleeping", nil)
	if err != nil {
		return false, fmt.Errorf("GET %s/is_sleeping: %w", addr, err)
	}
	resp, err := c.Do(req)
	if err != nil {
		return false, fmt.Errorf("GET %s/is_sleeping: %w", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false, answerError("GET", addr, "/is_sleeping", resp)
	}
	var v struct {
		IsSleeping *bool `json:"is_sleeping"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&v); err != nil || v.IsSleeping == nil {
		return false, fmt.Errorf("GET %s/is_sleeping: not {\"is_sleeping\": bool}", addr)
	}
	return *v.IsSleeping, nil
}

// WarmUp sends the server one completion of one token, with apiKey if it
// has one. The first request after vLLM loads a model in sleep mode is
// several times slower than the rest (the vLLM blog's "sleep mode" post):
// made once as the model loads, it is no client's.
func WarmUp(ctx context.Context, c *http.Client, addr, model, apiKey string) error {
	body, _ := json.Marshal(map[string]any{"model": model, "prompt": "Hello", "max_tokens": 1})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+"/v1/completions", bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("warm up %s: %w", addr, err)
	}
	req.Header.Set("Content-Type", "application/json")
	if apiKey != "" {
		req.Header.Set("Authorization", "Bearer "+apiKey)
	}
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("warm up %s: %w", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return answerError("POST", addr, "/v1/completions", resp)
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	return nil
}

// post sends one POST of a sleep-mode endpoint, which must answer 200.
func post(ctx context.Context, c *http.Client, addr, path string, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+path, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("POST %s%s: %w", addr, path, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("POST %s%s: %w", addr, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return answerError("POST", addr, path, resp)
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	return nil
}

// answerError says what a server answered instead of 200, with the start
// of its body, which is where vLLM says why ("Sleep mode is not
// enabled").
func answerError(method, addr, path string, resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	return fmt.Errorf("%s %s%s answered %s: %s", method, addr, path, resp.Status, strings.TrimSpace(string(b)))
}
