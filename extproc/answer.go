package extproc

import (
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
)

// Headers vgw sets. Envoy's route picks the upstream cluster from
// HeaderCluster (route_components.proto: cluster_header); Envoy ignores
// mutations of x-envoy-* and :authority, so these names are vgw's own.
const (
	HeaderModel      = "x-vgw-model"
	HeaderCluster    = "x-vgw-cluster"
	HeaderQueueDepth = "x-vgw-queue-depth"
)

// rejection is an answer vgw gives instead of sending the request on.
type rejection struct {
	status     int
	errType    string // OpenAI error "type"
	code       string // OpenAI error "code"; empty renders null
	param      string // OpenAI error "param"; empty renders null
	message    string
	retryAfter time.Duration // 0 sends no Retry-After
	reason     Reason
	outcome    Outcome
	rendered   []byte // the body, when already rendered
}

// openAIError is the error shape of the OpenAI API, which clients of an
// OpenAI-compatible server parse.
type openAIError struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}

func (r *rejection) body() []byte {
	if r.rendered != nil {
		return r.rendered
	}
	var e openAIError
	e.Error.Message, e.Error.Type = r.message, r.errType
	if r.param != "" {
		e.Error.Param = &r.param
	}
	if r.code != "" {
		e.Error.Code = &r.code
	}
	b, err := json.Marshal(&e)
	if err != nil { // cannot happen for strings; keep the answer well-formed anyway
		return []byte(`{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}`)
	}
	return b
}

// immediate renders r as the ImmediateResponse Envoy sends to the client.
func (r *rejection) immediate(depth int) *extprocv3.ProcessingResponse {
	return immediateResponse(r.status, r.body(), depth, r.retryAfter, reasonDetails[r.reason])
}

// immediateResponse is an answer vgw gives in Envoy's place, as JSON.
// Envoy's local reply keeps our content-type (source/common/http/utility.cc
// sets text/plain only when none is set).
//
// A retry hint goes out twice: retry-after-ms, which the OpenAI SDKs read
// first and to the millisecond, and Retry-After in whole seconds (rounded
// up) for every other client. It is never over MaxRetryAfter.
func immediateResponse(status int, body []byte, depth int, retryAfter time.Duration, details string) *extprocv3.ProcessingResponse {
	hs := []*corev3.HeaderValueOption{jsonContentType, depthHeader(depth)}
	if retryAfter > 0 {
		retryAfter = min(retryAfter, MaxRetryAfter)
		ms := max(1, (retryAfter+time.Millisecond-1)/time.Millisecond)
		sec := max(1, (retryAfter+time.Second-1)/time.Second)
		hs = append(hs,
			setHeader("retry-after", strconv.AppendInt(nil, int64(sec), 10)),
			setHeader("retry-after-ms", strconv.AppendInt(nil, int64(ms), 10)))
	}
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{
		ImmediateResponse: &extprocv3.ImmediateResponse{
			Status:  &typev3.HttpStatus{Code: typev3.StatusCode(status)},
			Headers: &extprocv3.HeaderMutation{SetHeaders: hs},
			Body:    body,
			Details: details,
		},
	}}
}

var jsonContentType = setHeader("content-type", []byte("application/json"))

// reasonDetails are Envoy's response code details for vgw's answers, as
// access logs show them (%RESPONSE_CODE_DETAILS%).
var reasonDetails = func() (d [len(reasonNames)]string) {
	for i, n := range reasonNames {
		d[i] = "vgw_" + n
	}
	return d
}()

// setHeader builds a header mutation entry. Envoy reads only raw_value in
// mutations (source/extensions/filters/http/ext_proc/mutation_utils.cc,
// applyHeaderMutations), so the value goes there.
func setHeader(key string, value []byte) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: key, RawValue: value}}
}

// printable returns s cut to at most n bytes, as valid UTF-8, for echoing
// a client's value in an error message and keeping it in the decision
// log. Envoy passes header bytes 0x80-0xFF through (its header validation
// refuses only NUL, CR and LF), and a string that is not UTF-8 could be
// neither marshalled into the admin API's protobuf nor logged faithfully,
// so each run of invalid bytes becomes U+FFFD.
func printable(s []byte, n int) string {
	if len(s) > n {
		s = s[:n]
		// Drop a rune the cut split in two.
		for i := 1; i < utf8.UTFMax && i <= len(s); i++ {
			if utf8.RuneStart(s[len(s)-i]) {
				if !utf8.FullRune(s[len(s)-i:]) {
					s = s[:len(s)-i]
				}
				break
			}
		}
	}
	if utf8.Valid(s) {
		return string(s)
	}
	return strings.ToValidUTF8(string(s), string(utf8.RuneError))
}

func badRequest(msg, code string) *rejection {
	return &rejection{status: 400, errType: "invalid_request_error", code: code, message: msg,
		reason: ReasonBadRequest, outcome: OutcomeRejected}
}

// unknownModel answers a model name that is not configured; name is the
// client's, already cut to a printable length.
func unknownModel(name string) *rejection {
	return &rejection{status: 404, errType: "invalid_request_error", param: "model", code: "model_not_found",
		message: "The model '" + name + "' does not exist or is not served here.",
		reason:  ReasonUnknownModel, outcome: OutcomeRejected}
}

func tooLarge(limit int) *rejection {
	return &rejection{status: 413, errType: "invalid_request_error", code: "request_too_large",
		message: "The request body is larger than " + strconv.Itoa(limit) + " bytes.",
		reason:  ReasonTooLarge, outcome: OutcomeRejected}
}

// queueFull answers a request that found the model's queue full. Its body
// depends on the model alone, so callers keep it rendered (modelEntry);
// under overload this is the answer most requests get.
func queueFull(model string, retryAfter time.Duration) *rejection {
	return &rejection{status: 429, errType: "rate_limit_exceeded", code: "queue_full",
		message:    "Too many requests are waiting for model '" + model + "'; retry later.",
		retryAfter: retryAfter, reason: ReasonQueueFull, outcome: OutcomeRejected}
}

// tenantQueueFull answers a request whose tenant has as many requests
// waiting for the model as its share allows (max_queue_per_tenant, or the
// tenant's own max_queue).
func tenantQueueFull(model, tenant string, retryAfter time.Duration) *rejection {
	return &rejection{status: 429, errType: "rate_limit_exceeded", code: "tenant_queue_full",
		message:    "Tenant '" + tenant + "' has as many requests waiting for model '" + model + "' as it may; retry later.",
		retryAfter: retryAfter, reason: ReasonTenantFull, outcome: OutcomeRejected}
}

// overBudget answers a request whose tenant has spent its budget of what
// (requests or tokens) per minute; wait is until it has refilled enough.
func overBudget(tenant, what string, perMinute int, wait time.Duration) *rejection {
	code := "rpm_exceeded"
	if what == "tokens" {
		code = "tpm_exceeded"
	}
	return &rejection{status: 429, errType: "rate_limit_exceeded", code: code,
		message:    "Tenant '" + tenant + "' has used its " + strconv.Itoa(perMinute) + " " + what + " per minute; retry later.",
		retryAfter: max(wait, time.Millisecond), reason: ReasonOverBudget, outcome: OutcomeRejected}
}

// displacedBy answers a request taken out of a full queue to make room
// for one of a higher priority, or of a tenant with fewer waiting.
func displacedBy(model string, retryAfter time.Duration) *rejection {
	return &rejection{status: 429, errType: "rate_limit_exceeded", code: "queue_full",
		message:    "Too many requests are waiting for model '" + model + "', and this one gave its place to a request of a higher priority or of a tenant with fewer waiting; retry later.",
		retryAfter: retryAfter, reason: ReasonDisplaced, outcome: OutcomeRejected}
}

func timedOut(model string, r Reason) *rejection {
	what := "a free slot"
	if r == ReasonLoadTimeout {
		what = "the model to load"
	}
	return &rejection{status: 504, errType: "timeout", code: r.String(),
		message: "The request for model '" + model + "' timed out waiting for " + what + ".",
		reason:  r, outcome: OutcomeTimedOut}
}

// unavailable answers a model that cannot serve; why is the cause, shown
// to the client, already cut to what a client may see and redacted.
func unavailable(model, why string, retryAfter time.Duration, r Reason) *rejection {
	msg := "Model '" + model + "' is unavailable"
	if why != "" {
		msg += ": " + why
	}
	return &rejection{status: 503, errType: "server_error", code: "model_unavailable", message: msg,
		retryAfter: retryAfter, reason: r, outcome: OutcomeRejected}
}

func draining(model string) *rejection {
	return unavailable(model, errDraining.Error(), retryAfterOf(nil), ReasonDraining)
}

var errDraining = errors.New("vgw is draining for maintenance or shutdown")
