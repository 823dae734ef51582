package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"mime/multipart"
	"slices"
	"testing"

	"github.com/vgw-project/vgw/extproc/extproctest"
)

// clientsConfig is a model with every kind of name, behind the shipped
// envoy.yaml.
const clientsConfig = `
runtime: {kind: sim}
load_timeout: 1m
min_resident: 0s
gpus: [{name: sim0, memory: 80GiB}]
default_model: gpt-4o-mini
models:
  llama-8b:
    repo: meta-llama/Llama-3.1-8B-Instruct
    aliases: [gpt-4o-mini]
    request_defaults: {max_tokens: 3}
    adapters: {sql-lora: /loras/sql}
    vram: 30GiB
  whisper: {repo: openai/whisper-large-v3, vram: 10GiB}
`

// TestRealClients sends what real OpenAI clients send, through the
// shipped envoy.yaml (its route table, header removal and local replies)
// to vgw and the sim runtime's servers: every row of issue 15's table.
func TestRealClients(t *testing.T) {
	s := startStack(t, clientsConfig)
	chat := func(model string) []byte {
		return []byte(`{"model":"` + model + `","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`)
	}
	upload := func(model string, size int) extproctest.Request {
		var b bytes.Buffer
		w := multipart.NewWriter(&b)
		fw, _ := w.CreateFormFile("file", "speech.mp3")
		fw.Write(bytes.Repeat([]byte{0xff, '\r', '\n', '-'}, size/4))
		w.WriteField("model", model) // after the file, as the OpenAI Go SDK writes it
		w.Close()
		return extproctest.Request{Path: "/v1/audio/transcriptions", Headers: []extproctest.Header{{Key: "content-type", Value: w.FormDataContentType()}}, Body: b.Bytes()}
	}
	tests := []struct {
		name   string
		req    extproctest.Request
		status int
		body   string // what the answer's body contains
		code   string // or its OpenAI error code
	}{
		{name: "the HF repo id", req: extproctest.Request{Body: chat("meta-llama/Llama-3.1-8B-Instruct")}, status: 200, body: `"model":"llama-8b"`},
		{name: "an alias", req: extproctest.Request{Body: chat("gpt-4o-mini")}, status: 200, body: `"model":"llama-8b"`},
		{name: "an adapter", req: extproctest.Request{Body: chat("sql-lora")}, status: 200, body: `"model":"sql-lora"`},
		{name: "request defaults under the body", req: extproctest.Request{Body: []byte(`{"model":"llama-8b","messages":[]}`)}, status: 200, body: `"content":"token token token"`},
		{name: "the client's keys win", req: extproctest.Request{Body: []byte(`{"model":"llama-8b","messages":[],"max_tokens":1}`)}, status: 200, body: `"content":"token"`},
		{name: "no model: the default model", req: extproctest.Request{Body: []byte(`{"messages":[]}`)}, status: 200, body: `"model":"llama-8b"`},
		{name: "embeddings", req: extproctest.Request{Path: "/v1/embeddings", Body: []byte(`{"model":"llama-8b","input":"hi"}`)}, status: 200, body: `"embedding":[`},
		{name: "models.retrieve with a slash", req: extproctest.Request{Method: "GET", Path: "/v1/models/meta-llama/Llama-3.1-8B-Instruct"}, status: 200, body: `"id":"meta-llama/Llama-3.1-8B-Instruct"`},
		{name: "an adapter's card", req: extproctest.Request{Method: "GET", Path: "/v1/models/sql-lora"}, status: 200, body: `"parent":"llama-8b"`},
		{name: "an unknown card", req: extproctest.Request{Method: "GET", Path: "/v1/models/gpt-5"}, status: 404, code: "model_not_found"},
		{name: "health", req: extproctest.Request{Method: "GET", Path: "/health"}, status: 200, body: `{"status":"ok"}`},
		{name: "HEAD", req: extproctest.Request{Method: "HEAD", Path: "/v1/models"}, status: 200},
		{name: "OPTIONS (no cross-origin grant: that is Envoy's CORS filter's)", req: extproctest.Request{Method: "OPTIONS", Path: "/v1/chat/completions"}, status: 204},
		{name: "GET /version", req: extproctest.Request{Method: "GET", Path: "/version"}, status: 404, code: "not_found"},
		{name: "a Whisper upload of 20 MiB, model after the file", req: upload("openai/whisper-large-v3", 20<<20), status: 200, body: `"text":"heard `},
		{name: "an upload over 25 MiB", req: upload("whisper", 26<<20), status: 413, code: "request_too_large"},
		{name: "a chunked body over the limit", req: extproctest.Request{Body: bytes.Repeat([]byte(" "), 9<<20), Chunked: true}, status: 413, code: "request_payload_too_large"},
		{name: "x-vgw-model from a client", req: extproctest.Request{Body: chat("llama-8b"), Headers: []extproctest.Header{{Key: "x-vgw-model", Value: "whisper"}}}, status: 200, body: `"model":"llama-8b"`},
		{name: "x-vgw-cluster from a client", req: extproctest.Request{Body: chat("nope"), Headers: []extproctest.Header{{Key: "x-vgw-cluster", Value: "vgw_llama-8b"}}}, status: 404, code: "model_not_found"},
		{name: "vLLM's /sleep, model header and all", req: extproctest.Request{Path: "/sleep?level=1", Body: chat("whisper"), Headers: []extproctest.Header{{Key: "x-vgw-model", Value: "whisper"}}}, status: 404, code: "not_found"},
		{name: "vLLM's /collective_rpc", req: extproctest.Request{Path: "/collective_rpc", Body: []byte(`{"model":"whisper","method":"reload_weights"}`)}, status: 404, code: "not_found"},
		{name: "a backend's /metrics", req: extproctest.Request{Method: "GET", Path: "/metrics", Headers: []extproctest.Header{{Key: "x-vgw-model", Value: "llama-8b"}}}, status: 404, code: "not_found"},
		{name: "a bodiless POST", req: extproctest.Request{Path: "/v1/chat/completions"}, status: 400, code: "missing_model"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := s.ExtProc.Do(context.Background(), tt.req)
			if err != nil {
				t.Fatal(err)
			}
			if res.Status != tt.status {
				t.Fatalf("status %d (%s) %.300s, want %d", res.Status, res.Details, res.Body, tt.status)
			}
			if tt.body != "" && !bytes.Contains(res.Body, []byte(tt.body)) {
				t.Errorf("body %.300s, want it to hold %s", res.Body, tt.body)
			}
			if tt.code != "" {
				var e struct {
					Error struct {
						Code string `json:"code"`
					} `json:"error"`
				}
				if err := json.Unmarshal(res.Body, &e); err != nil || e.Error.Code != tt.code {
					t.Errorf("body %.300s (%v), want the OpenAI error shape with code %q", res.Body, err, tt.code)
				}
				if ct := res.Get("content-type"); ct != "application/json" {
					t.Errorf("content-type %q", ct)
				}
			}
		})
	}
	// The admin endpoints loaded nothing, and what vgw answered itself
	// without an error is no error in its counts.
	if n := s.loads("whisper"); n != 1 {
		t.Errorf("whisper loaded %d times, want once (for the upload)", n)
	}
	var errs []string
	for model, c := range s.app.ep.Counts() {
		for status, n := range c.Statuses {
			errs = append(errs, fmt.Sprintf("%q %d ×%d", model, status, n))
		}
	}
	slices.Sort(errs)
	// The bodiless POST, the unknown model behind x-vgw-cluster, and the
	// upload over the limit: nothing else.
	if want := []string{`"" 400 ×1`, `"" 404 ×1`, `"" 413 ×1`}; !slices.Equal(errs, want) {
		t.Errorf("error counts %q, want %q", errs, want)
	}
}
