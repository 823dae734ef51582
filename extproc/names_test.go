package extproc_test

import (
	"context"
	"encoding/json"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/extproc/extproctest"
)

// namedModels are a model with every kind of name, and a plain one.
var namedModels = []extproc.Model{
	{Name: "llama-8b", Aliases: []string{"meta-llama/Llama-3.1-8B-Instruct", "gpt-4o-mini"}, Adapters: []string{"sql-lora"}, Limits: limits(4, 4, time.Second)},
	{Name: "qwen", Limits: limits(4, 4, time.Second)},
}

// TestModelNames: a request naming a model by its key, its repo, an alias
// or an adapter is the model's: routed to its cluster, in its queue and
// counts, the upstream told the model's own name. An alias (the repo is
// one) goes on renamed to the model's own name, which its server answers
// to, content-length and all; the key and an adapter go on as they came.
func TestModelNames(t *testing.T) {
	h := start(t, namedModels)
	for _, tc := range []struct{ name, sent string }{
		{"llama-8b", "llama-8b"}, {"meta-llama/Llama-3.1-8B-Instruct", "llama-8b"}, {"gpt-4o-mini", "llama-8b"}, {"sql-lora", "sql-lora"},
	} {
		name := tc.name
		res := do(t, h, context.Background(), req(name, chat(name)))
		if res.Status != 200 || res.Forwarded == nil || res.Forwarded.Cluster != "vgw/llama-8b" {
			t.Fatalf("%s: status %d, routed to %+v, want vgw/llama-8b", name, res.Status, res.Forwarded)
		}
		if got := res.Forwarded.Get("x-vgw-model"); got != "llama-8b" {
			t.Errorf("%s: upstream x-vgw-model %q, want the model's own name", name, got)
		}
		if got := string(res.Forwarded.Body); got != string(chat(tc.sent)) {
			t.Errorf("%s: sent %s, want %s", name, got, chat(tc.sent))
		}
		if cl := res.Forwarded.Get("content-length"); cl != strconv.Itoa(len(chat(tc.sent))) {
			t.Errorf("%s: content-length %s", name, cl)
		}
		if obs := <-h.leases.obsCh; obs.model != "llama-8b" {
			t.Errorf("%s: leased %q", name, obs.model)
		}
	}
	if got := h.srv.Counts()["llama-8b"].Outcomes[extproc.OutcomeAdmitted]; got != 4 {
		t.Errorf("admitted %d under llama-8b, want 4", got)
	}
	if _, ok := h.srv.Counts()["gpt-4o-mini"]; ok {
		t.Error("an alias has counts of its own")
	}
	// A name of no model, and one that differs only in case, are unknown.
	for _, name := range []string{"GPT-4o-mini", "llama-8b/sql-lora"} {
		if res := do(t, h, context.Background(), req(name, chat(name))); res.Status != 404 {
			t.Errorf("%s: status %d, want 404", name, res.Status)
		}
	}
	// A reload that drops an alias drops its route; the model keeps its
	// queue and counts.
	h.srv.SetModels(withClusters([]extproc.Model{{Name: "llama-8b", Limits: limits(4, 4, time.Second)}}))
	if res := do(t, h, context.Background(), req("x", chat("gpt-4o-mini"))); res.Status != 404 {
		t.Errorf("a dropped alias: status %d, want 404", res.Status)
	}
	if got := h.srv.Counts()["llama-8b"].Outcomes[extproc.OutcomeAdmitted]; got != 4 {
		t.Errorf("after the reload, admitted %d under llama-8b, want 4", got)
	}
}

// card is an entry of vgw's model list.
type card struct {
	ID       string  `json:"id"`
	Object   string  `json:"object"`
	OwnedBy  string  `json:"owned_by"`
	Parent   *string `json:"parent"`
	VGWState string  `json:"vgw_state"`
}

// TestLocalAnswers: what names no model is answered by vgw at its
// headers, as an HTTP client expects, and none of it is an admission
// decision: no lease, no queue, no count, nothing in the decision log.
func TestLocalAnswers(t *testing.T) {
	states := map[string]string{"llama-8b": "ready", "qwen": "stopped"}
	h := start(t, namedModels, extproc.Options{State: func(m string) string { return states[m] }})
	get := func(method, path string) extproctest.Request { return extproctest.Request{Method: method, Path: path} }
	tests := []struct {
		name   string
		req    extproctest.Request
		status int
		body   string // the answer's body, or its OpenAI error code
		allow  string
	}{
		{name: "a model by its key", req: get("GET", "/v1/models/qwen"), status: 200, body: `{"id":"qwen","object":"model","created":*,"owned_by":"vgw","parent":null,"vgw_state":"stopped"}`},
		{name: "a model by its repo, with its slash", req: get("GET", "/v1/models/meta-llama/Llama-3.1-8B-Instruct"), status: 200,
			body: `{"id":"meta-llama/Llama-3.1-8B-Instruct","object":"model","created":*,"owned_by":"vgw","parent":null,"vgw_state":"ready"}`},
		{name: "the slash escaped", req: get("GET", "/v1/models/meta-llama%2FLlama-3.1-8B-Instruct?x=1"), status: 200,
			body: `{"id":"meta-llama/Llama-3.1-8B-Instruct","object":"model","created":*,"owned_by":"vgw","parent":null,"vgw_state":"ready"}`},
		{name: "an adapter, with its parent", req: get("GET", "/v1/models/sql-lora"), status: 200,
			body: `{"id":"sql-lora","object":"model","created":*,"owned_by":"vgw","parent":"llama-8b","vgw_state":"ready"}`},
		{name: "an unknown model", req: get("GET", "/v1/models/gpt-5"), status: 404, body: "model_not_found"},
		{name: "HEAD of the list", req: get("HEAD", "/v1/models"), status: 200, body: ""},
		{name: "HEAD of a model", req: get("HEAD", "/v1/models/qwen"), status: 200, body: ""},
		{name: "health", req: get("GET", "/health"), status: 200, body: `{"status":"ok"}`},
		{name: "healthz", req: get("GET", "/healthz"), status: 200, body: `{"status":"ok"}`},
		{name: "HEAD of health", req: get("HEAD", "/health"), status: 200, body: ""},
		{name: "a preflight", req: get("OPTIONS", "/v1/chat/completions"), status: 204, body: "", allow: "POST, OPTIONS"},
		{name: "OPTIONS of the list", req: get("OPTIONS", "/v1/models"), status: 204, body: "", allow: "GET, HEAD, OPTIONS"},
		{name: "GET of an inference path", req: get("GET", "/v1/chat/completions"), status: 405, body: "method_not_allowed", allow: "POST, OPTIONS"},
		{name: "HEAD of an inference path", req: get("HEAD", "/v1/completions"), status: 405, body: "", allow: "POST, OPTIONS"},
		{name: "POST to the list", req: extproctest.Request{Path: "/v1/models", Body: chat("qwen")}, status: 405, body: "method_not_allowed", allow: "GET, HEAD, OPTIONS"},
		{name: "DELETE of a model", req: get("DELETE", "/v1/models/qwen"), status: 405, body: "method_not_allowed", allow: "GET, HEAD, OPTIONS"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := do(t, h, context.Background(), tt.req)
			if res.Status != tt.status || !res.Immediate || res.Forwarded != nil {
				t.Fatalf("status %d immediate %v (%s) body %q, want %d from vgw", res.Status, res.Immediate, res.Details, res.Body, tt.status)
			}
			if want := []string{"request_headers"}; !slices.Equal(res.Sent, want) {
				t.Errorf("Envoy sent %v, want only the headers", res.Sent)
			}
			if got := res.Get("allow"); got != tt.allow {
				t.Errorf("allow %q, want %q", got, tt.allow)
			}
			switch {
			case tt.body == "" || tt.body[0] == '{':
				if got := stripCreated(t, res.Body); got != tt.body {
					t.Errorf("body %s, want %s", got, tt.body)
				}
			default:
				if _, code, _ := openAIError(t, res.Body); code != tt.body {
					t.Errorf("code %q, want %q", code, tt.body)
				}
			}
		})
	}

	res := do(t, h, context.Background(), get("GET", "/v1/models"))
	var list struct {
		Object string `json:"object"`
		Data   []card `json:"data"`
	}
	if err := json.Unmarshal(res.Body, &list); err != nil || res.Status != 200 || list.Object != "list" {
		t.Fatalf("list: %d %v %s", res.Status, err, res.Body)
	}
	var got []string
	for _, c := range list.Data {
		parent := "-"
		if c.Parent != nil {
			parent = *c.Parent
		}
		got = append(got, c.ID+" "+parent+" "+c.VGWState)
	}
	want := []string{"gpt-4o-mini - ready", "llama-8b - ready", "meta-llama/Llama-3.1-8B-Instruct - ready", "qwen - stopped", "sql-lora llama-8b ready"}
	if !slices.Equal(got, want) {
		t.Errorf("list %q, want %q", got, want)
	}

	// Draining: health says so, 503 with Retry-After.
	h.srv.SetDraining(true)
	res = do(t, h, context.Background(), get("GET", "/health"))
	if _, code, _ := openAIError(t, res.Body); res.Status != 503 || code != "model_unavailable" || res.Get("retry-after") == "" {
		t.Errorf("health while draining: %d %s retry-after %q", res.Status, res.Body, res.Get("retry-after"))
	}
	h.srv.SetDraining(false)

	for model, c := range h.srv.Counts() {
		if len(c.Outcomes) > 0 || len(c.Statuses) > 0 {
			t.Errorf("counted under %q: %+v", model, c)
		}
	}
	if d := h.srv.Decisions().Recent(extproc.Filter{}); len(d) > 0 {
		t.Errorf("decisions recorded: %+v", d)
	}
	h.leases.mu.Lock()
	defer h.leases.mu.Unlock()
	if len(h.leases.observed) > 0 {
		t.Errorf("leases taken: %+v", h.leases.observed)
	}
}

// stripCreated replaces the created time of a model card with *.
func stripCreated(t *testing.T, b []byte) string {
	t.Helper()
	return createdField.ReplaceAllString(string(b), `"created":*`)
}

var createdField = regexp.MustCompile(`"created":[0-9]+`)

// TestClientModelHeader: unless the operator trusts it, a client's
// x-vgw-model changes nothing: the body's model decides, its body is
// read and limited as any other, and the upstream is told vgw's name.
// Trusted, the header decides, and the body is not read.
func TestClientModelHeader(t *testing.T) {
	for _, tc := range []struct {
		name   string
		trust  bool
		header string
		status int
		routed string
		sent   []string
	}{
		{name: "another model", header: "qwen", status: 200, routed: "llama-8b", sent: []string{"request_headers", "request_body", "response_headers"}},
		{name: "no model", header: "gpt-5", status: 200, routed: "llama-8b", sent: []string{"request_headers", "request_body", "response_headers"}},
		{name: "trusted, another model", trust: true, header: "qwen", status: 200, routed: "qwen", sent: []string{"request_headers", "response_headers"}},
		{name: "trusted, no model", trust: true, header: "gpt-5", status: 404, sent: []string{"request_headers"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, namedModels, extproc.Options{TrustModelHeader: tc.trust})
			r := req("h", chat("llama-8b"))
			r.Headers = append(r.Headers, extproctest.Header{Key: "x-vgw-model", Value: tc.header})
			res := do(t, h, context.Background(), r)
			if res.Status != tc.status {
				t.Fatalf("status %d (%s) %s, want %d", res.Status, res.Details, res.Body, tc.status)
			}
			if !slices.Equal(res.Sent, tc.sent) {
				t.Errorf("Envoy sent %v, want %v", res.Sent, tc.sent)
			}
			if tc.routed == "" {
				return
			}
			if res.Forwarded.Cluster != clusterOf(tc.routed) || res.Forwarded.Get("x-vgw-model") != tc.routed {
				t.Errorf("routed to %s with x-vgw-model %q, want %s", res.Forwarded.Cluster, res.Forwarded.Get("x-vgw-model"), tc.routed)
			}
			h.idle(t, tc.routed)
		})
	}
}

// TestRequestDefaults: a model's request defaults reach its server under
// the client's body, with a content-length that matches (the harness
// fails the request as Envoy would otherwise); a model without any gets
// its body untouched; a request naming no model goes to the default
// model, its body naming it by its own name (default_model may be an
// alias, which its server does not answer to).
func TestRequestDefaults(t *testing.T) {
	h := start(t, []extproc.Model{
		{Name: "llama", Defaults: []byte(`{"temperature":0.2,"max_tokens":64}`), DefaultFor: "gpt-4o-mini", Aliases: []string{"gpt-4o-mini"}, Limits: limits(4, 4, time.Second)},
		{Name: "qwen", Limits: limits(4, 4, time.Second)},
	})
	for _, tc := range []struct {
		name, body, routed, sent string
	}{
		{"lacks both", `{"model":"llama","messages":[]}`, "llama", `{"model":"llama","messages":[],"max_tokens":64,"temperature":0.2}`},
		{"sets one", `{"model":"llama","temperature":1}`, "llama", `{"model":"llama","temperature":1,"max_tokens":64}`},
		{"sets both", `{"model":"llama","temperature":1,"max_tokens":2}`, "llama", `{"model":"llama","temperature":1,"max_tokens":2}`},
		{"another model", `{"model":"qwen"}`, "qwen", `{"model":"qwen"}`},
		{"an alias, with defaults", `{"model":"gpt-4o-mini","temperature":1}`, "llama", `{"model":"llama","temperature":1,"max_tokens":64}`},
		{"a model that is not a string", `{"model":7}`, "", ""},
		{"no model", `{"messages":[]}`, "llama", `{"messages":[],"model":"llama","max_tokens":64,"temperature":0.2}`},
		// vLLM takes a null or empty model as none.
		{"a null model", `{"model": null,"messages":[]}`, "llama", `{"model": "llama","messages":[],"max_tokens":64,"temperature":0.2}`},
		{"an empty model", `{"messages":[],"model":"", "max_tokens":1}`, "llama", `{"messages":[],"model":"llama", "max_tokens":1,"temperature":0.2}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := do(t, h, context.Background(), req("d", []byte(tc.body)))
			if tc.routed == "" {
				if res.Status != 400 {
					t.Fatalf("status %d, want 400", res.Status)
				}
				return
			}
			if res.Status != 200 || res.Forwarded == nil || res.Forwarded.Cluster != clusterOf(tc.routed) {
				t.Fatalf("status %d (%s) %s, routed %+v, want %s", res.Status, res.Details, res.Body, res.Forwarded, tc.routed)
			}
			if got := string(res.Forwarded.Body); got != tc.sent {
				t.Errorf("sent %s, want %s", got, tc.sent)
			}
			if cl := res.Forwarded.Get("content-length"); cl != strconv.Itoa(len(tc.sent)) {
				t.Errorf("content-length %s for %d bytes", cl, len(tc.sent))
			}
			h.idle(t, tc.routed)
		})
	}
}
