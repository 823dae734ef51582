package extproc_test

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/extproc/extproctest"
)

// nested returns a body whose first key holds depth nested arrays, then
// the model.
func nested(depth int, model string) []byte {
	return []byte(`{"x":` + strings.Repeat("[", depth) + strings.Repeat("]", depth) + `,"model":"` + model + `"}`)
}

// TestHostileInput sends what a careless or hostile client might, through
// the Envoy these tests play. Each gets its documented answer (README,
// "Answers") and changes nothing else: no slot is taken or leaked, the
// manager is not asked for anything, the model list stays as it was, and
// what vgw keeps of the request (its decision, its log line) is valid
// UTF-8 on one line, whatever bytes the client sent.
func TestHostileInput(t *testing.T) {
	var logs syncBuffer
	log := slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	h := start(t, []extproc.Model{{Name: "llama", Limits: limits(4, 4, time.Second)}, {Name: "qwen", Limits: limits(4, 4, time.Second)}},
		extproc.Options{MaxBody: 1 << 20, Log: log, TrustModelHeader: true}) // the header rows try the fast path
	header := func(v string) extproctest.Request {
		return extproctest.Request{Headers: []extproctest.Header{{Key: "x-vgw-model", Value: v}}, Body: chat("llama")}
	}
	hundredMB := bytes.Repeat([]byte(" "), 100<<20)
	copy(hundredMB, `{"model":"llama","prompt":"`)
	tests := []struct {
		name   string
		req    extproctest.Request
		status int    // what the client gets
		code   string // the OpenAI error code; "" for an admitted request or Envoy's own answer
		model  string // the model a rejection names in its decision
		routed string // the model an admitted request is routed to
	}{
		{name: "empty body", req: req("e", nil), status: 400, code: "missing_model"},
		{name: "whitespace body", req: req("w", []byte(" \n\t ")), status: 400, code: "invalid_json"},
		{name: "100 MB with its length", req: req("b", hundredMB), status: 413, code: "request_too_large"},
		// Without a length, Envoy stops buffering at its limit and answers
		// 413 itself (ENVOY-FACTS §8): vgw never sees the body.
		{name: "100 MB chunked", req: extproctest.Request{Body: hundredMB, Chunked: true}, status: 413},
		{name: "10,000 deep before the model", req: req("d", nested(extproc.MaxNesting, "llama")), status: 200, routed: "llama"},
		{name: "10,001 deep before the model", req: req("d", nested(extproc.MaxNesting+1, "llama")), status: 400, code: "invalid_json"},
		{name: "100,000 unclosed", req: req("u", []byte(`{"x":`+strings.Repeat("[", 100000))), status: 400, code: "invalid_json"},
		{name: "invalid UTF-8 in the model", req: req("8", []byte("{\"model\":\"lla\xffma\"}")), status: 400, code: "invalid_json"},
		// Strings vgw skips are the backend's to judge, like everything
		// after the model.
		{name: "invalid UTF-8 elsewhere", req: req("9", []byte("{\"prompt\":\"\xff\xfe\",\"model\":\"llama\"}")), status: 200, routed: "llama"},
		{name: "NUL in the model", req: req("0", []byte("{\"model\":\"llama\x00\"}")), status: 400, code: "invalid_json"},
		{name: "escaped NUL in the model", req: req("0", []byte(`{"model":"llama\u0000"}`)), status: 404, code: "model_not_found", model: "llama\x00"},
		// Duplicate keys: vgw routes on the first (README, "Answers"), and
		// never falls back to a later one.
		{name: "duplicate model, first known", req: req("2", []byte(`{"model":"llama","model":"qwen"}`)), status: 200, routed: "llama"},
		{name: "duplicate model, first unknown", req: req("3", []byte(`{"model":"gpt-5","model":"llama"}`)), status: 404, code: "model_not_found", model: "gpt-5"},
		{name: "empty model", req: req("4", []byte(`{"model":""}`)), status: 400, code: "missing_model"},
		{name: "slash", req: req("5", chat("llama/qwen")), status: 404, code: "model_not_found", model: "llama/qwen"},
		{name: "dot-dot", req: req("6", chat("../../etc/passwd")), status: 404, code: "model_not_found", model: "../../etc/passwd"},
		{name: "spaces", req: req("7", chat(" llama ")), status: 404, code: "model_not_found", model: " llama "},
		{name: "quotes", req: req("q", chat(`lla\"ma'`)), status: 404, code: "model_not_found", model: `lla"ma'`},
		{name: "shell", req: req("s", chat("llama; rm -rf / $(reboot) `id` | nc x 1 && echo >/tmp/x")), status: 404, code: "model_not_found",
			model: "llama; rm -rf / $(reboot) `id` | nc x 1 && echo >/tmp/x"},
		{name: "escaped CR LF", req: req("c", chat(`llama\r\nx-vgw-cluster: vgw/qwen`)), status: 404, code: "model_not_found", model: "llama\r\nx-vgw-cluster: vgw/qwen"},
		{name: "long", req: req("l", chat(strings.Repeat("é", 1000))), status: 404, code: "model_not_found", model: strings.Repeat("é", 128)},
		{name: "header: CR LF", req: header("llama\r\nx-vgw-cluster: vgw/qwen"), status: 404, code: "model_not_found", model: "llama\r\nx-vgw-cluster: vgw/qwen"},
		{name: "header: invalid UTF-8", req: header("lla\xff\xfema"), status: 404, code: "model_not_found", model: "lla\uFFFDma"},
		{name: "header: dot-dot", req: header("../llama"), status: 404, code: "model_not_found", model: "../llama"},
		{name: "header: long and split mid-rune", req: header("a" + strings.Repeat("é", 200)), status: 404, code: "model_not_found", model: "a" + strings.Repeat("é", 127)},
		{name: "header: known", req: header("qwen"), status: 200, routed: "qwen"},
	}
	models := do(t, h, context.Background(), extproctest.Request{Method: "GET", Path: "/v1/models"}).Body
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h.leases.mu.Lock()
			before := len(h.leases.observed)
			h.leases.mu.Unlock()
			res := do(t, h, context.Background(), tt.req)
			if res.Status != tt.status {
				t.Fatalf("status %d (%s) body %.200q, want %d", res.Status, res.Details, res.Body, tt.status)
			}
			if tt.routed != "" {
				if res.Forwarded == nil || res.Forwarded.Cluster != clusterOf(tt.routed) {
					t.Fatalf("routed to %+v, want %s", res.Forwarded, tt.routed)
				}
				h.idle(t, tt.routed)
				<-h.leases.obsCh
				return
			}
			if res.Forwarded != nil {
				t.Fatal("a rejected request reached the upstream")
			}
			if tt.code == "" {
				return // Envoy's own answer
			}
			if !res.Immediate || !utf8.Valid(res.Body) || !json.Valid(res.Body) {
				t.Fatalf("answer %.200q: want vgw's JSON, valid UTF-8", res.Body)
			}
			if _, code, _ := openAIError(t, res.Body); code != tt.code {
				t.Errorf("code %q, want %q", code, tt.code)
			}
			for _, hd := range res.Headers {
				if strings.ContainsAny(hd.Value, "\r\n") || strings.HasPrefix(hd.Key, "x-vgw-cluster") {
					t.Errorf("answer header %q: %q", hd.Key, hd.Value)
				}
			}
			d := h.srv.Decisions().Recent(extproc.Filter{Limit: 1})
			if len(d) != 1 || d[0].Status != tt.status || d[0].Model != tt.model || !utf8.ValidString(d[0].Model) {
				t.Errorf("decision %+v, want status %d for model %q", d, tt.status, tt.model)
			}
			if tt.status == 404 {
				var e struct{ Error struct{ Message string } }
				json.Unmarshal(res.Body, &e)
				if !strings.Contains(e.Error.Message, "'"+tt.model+"'") {
					t.Errorf("message %q does not quote the name %q", e.Error.Message, tt.model)
				}
			}
			h.leases.mu.Lock()
			after := len(h.leases.observed)
			h.leases.mu.Unlock()
			if after != before {
				t.Error("the manager heard of a rejected request")
			}
		})
	}
	for _, m := range []string{"llama", "qwen"} {
		h.idle(t, m)
	}
	if got := do(t, h, context.Background(), extproctest.Request{Method: "GET", Path: "/v1/models"}).Body; !bytes.Equal(got, models) {
		t.Errorf("the model list changed: %s, was %s", got, models)
	}
	// One JSON object per log line: no client byte split or forged a line.
	lines := strings.Split(strings.TrimSuffix(logs.String(), "\n"), "\n")
	for _, l := range lines {
		if !json.Valid([]byte(l)) || !utf8.ValidString(l) {
			t.Errorf("log line is not one JSON object: %.200q", l)
		}
	}
	decided := 0
	for _, tt := range tests {
		if tt.code != "" || tt.routed != "" {
			decided++
		}
	}
	if len(lines) < decided {
		t.Errorf("%d log lines for %d decisions: each is logged at debug", len(lines), decided)
	}
}
