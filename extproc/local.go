package extproc

import (
	"bytes"
	"encoding/json"
	"net/url"
	"slices"
	"strings"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
)

// Some requests name no model to route to, and vgw answers them itself at
// their headers: the model list and a model's card (what the OpenAI SDKs'
// models.list and models.retrieve call), vgw's health through Envoy (what
// a load balancer in front of Envoy checks), and an OPTIONS request (what
// an HTTP client asks before it sends). They are not admission decisions:
// no model's queue, decision log or counts hear of them.

// target is what a request's path asks for.
type target uint8

const (
	targetInference target = iota // anything else: routed by its model
	targetAudio                   // /v1/audio/transcriptions, translations: uploads
	targetModels                  // /v1/models
	targetModel                   // /v1/models/{id}
	targetHealth                  // /health, /healthz
)

// targetOf reads what a request's :path asks for, and for a model's card
// the model's id, unescaped: a Hugging Face id has a slash, which a
// client may send as is or as %2F.
func targetOf(path []byte) (target, string) {
	if i := bytes.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	switch string(path) {
	case "/v1/models", "/v1/models/":
		return targetModels, ""
	case "/health", "/healthz":
		return targetHealth, ""
	case "/v1/audio/transcriptions", "/v1/audio/translations":
		return targetAudio, ""
	}
	if id, ok := bytes.CutPrefix(path, []byte("/v1/models/")); ok {
		s, err := url.PathUnescape(string(id))
		if err != nil {
			s = string(id)
		}
		return targetModel, s
	}
	return targetInference, ""
}

// local answers a request vgw serves itself, and reports whether it was
// one. It runs for every request before anything else, so it decides
// from the method and target alone, allocating nothing for an inference
// request.
func (st *stream) local(method []byte, t target, id string) (bool, error) {
	if string(method) == "OPTIONS" {
		return true, st.send(optionsReply(t))
	}
	switch t {
	case targetInference, targetAudio:
		if string(method) != "POST" {
			return true, st.send(methodNotAllowed(method, "POST, OPTIONS"))
		}
		return false, nil
	case targetHealth:
		if !readMethod(method) {
			return true, st.send(methodNotAllowed(method, "GET, HEAD, OPTIONS"))
		}
		if st.s.draining.Load() {
			r := unavailable("", errDraining.Error(), retryAfterOf(nil), ReasonDraining)
			r.message = "vgw is unavailable: " + errDraining.Error()
			return true, st.send(headless(method, immediateResponse(r.status, r.body(), 0, r.retryAfter, "vgw_health")))
		}
		return true, st.send(headless(method, immediateResponse(200, healthyBody, 0, 0, "vgw_health")))
	}
	if !readMethod(method) {
		return true, st.send(methodNotAllowed(method, "GET, HEAD, OPTIONS"))
	}
	if t == targetModels {
		return true, st.send(headless(method, immediateResponse(200, st.s.modelList(), 0, 0, "vgw_model_list")))
	}
	card, ok := st.s.modelCard(id)
	if !ok {
		r := unknownModel(printable([]byte(id), 256))
		return true, st.send(headless(method, immediateResponse(r.status, r.body(), 0, 0, "vgw_model_card")))
	}
	return true, st.send(headless(method, immediateResponse(200, card, 0, 0, "vgw_model_card")))
}

var healthyBody = []byte(`{"status":"ok"}`)

func readMethod(method []byte) bool { return string(method) == "GET" || string(method) == "HEAD" }

// headless drops the body of an answer to HEAD, which has none.
func headless(method []byte, r *extprocv3.ProcessingResponse) *extprocv3.ProcessingResponse {
	if string(method) == "HEAD" {
		r.GetImmediateResponse().Body = nil
	}
	return r
}

// optionsReply answers OPTIONS with the methods the target takes. It
// grants no cross-origin access: a deployment that serves browsers puts
// Envoy's CORS filter before ext_proc, and that filter answers a
// preflight itself (envoy/envoy.yaml says how).
func optionsReply(t target) *extprocv3.ProcessingResponse {
	allow := "POST, OPTIONS"
	if t != targetInference && t != targetAudio {
		allow = "GET, HEAD, OPTIONS"
	}
	r := immediateResponse(204, nil, 0, 0, "vgw_options")
	hs := r.GetImmediateResponse().Headers
	hs.SetHeaders = append(hs.SetHeaders[:0], setHeader("allow", []byte(allow)))
	return r
}

// methodNotAllowed answers a method the target does not take, as vLLM's
// server does (405, with Allow), in the OpenAI error shape.
func methodNotAllowed(method []byte, allow string) *extprocv3.ProcessingResponse {
	r := &rejection{status: 405, errType: "invalid_request_error", code: "method_not_allowed",
		message: "Method " + printable(method, 16) + " is not allowed here; use " + allow + "."}
	resp := headless(method, immediateResponse(r.status, r.body(), 0, 0, "vgw_method_not_allowed"))
	hs := resp.GetImmediateResponse().Headers
	hs.SetHeaders = append(hs.SetHeaders, setHeader("allow", []byte(allow)))
	return resp
}

// modelCard is one entry of the model list, in OpenAI's shape with
// vLLM's parent (the base model of an adapter, null otherwise) and
// vgw's state of the model behind the name.
type modelCard struct {
	ID       string  `json:"id"`
	Object   string  `json:"object"`
	Created  int64   `json:"created"`
	OwnedBy  string  `json:"owned_by"`
	Parent   *string `json:"parent"`
	VGWState string  `json:"vgw_state,omitempty"`
}

func (s *Server) card(n *listedName) modelCard {
	c := modelCard{ID: n.id, Object: "model", Created: s.started.Unix(), OwnedBy: "vgw", VGWState: s.state(n.model.name)}
	if n.parent != "" {
		c.Parent = &n.parent
	}
	return c
}

// modelList renders the answer to GET /v1/models: every name clients may
// use, sorted, with the state of the model behind each.
func (s *Server) modelList() []byte {
	t := s.models.Load()
	list := struct {
		Object string      `json:"object"`
		Data   []modelCard `json:"data"`
	}{Object: "list", Data: make([]modelCard, 0, len(t.listed))}
	for i := range t.listed {
		list.Data = append(list.Data, s.card(&t.listed[i]))
	}
	b, _ := json.Marshal(list) // strings and ints only: cannot fail
	return b
}

// modelCard renders the answer to GET /v1/models/{id}, or reports that
// no model goes by id.
func (s *Server) modelCard(id string) ([]byte, bool) {
	t := s.models.Load()
	i, ok := slices.BinarySearchFunc(t.listed, id, func(n listedName, id string) int { return strings.Compare(n.id, id) })
	if !ok {
		return nil, false
	}
	b, _ := json.Marshal(s.card(&t.listed[i]))
	return b, true
}
