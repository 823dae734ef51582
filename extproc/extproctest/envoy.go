// Package extproctest plays Envoy's part against an ext_proc server, over
// real gRPC, for tests and load drivers on machines without Envoy.
//
// An Envoy carries one HTTP request per Do call through the exchange that
// Envoy's ext_proc filter (source/extensions/filters/http/ext_proc/) would
// have with the server under a given filter config: which messages it sends
// in which processing mode, the per-message timeout and its override, mode
// overrides, header mutations with clear_route_cache and cluster_header
// routing, immediate responses, fail-closed errors, and when it closes the
// stream. The behaviours and their sources are listed in
// ../shared/ENVOY-FACTS.md; each is cited where it is played here.
package extproctest

import (
	"context"
	"errors"
	"io"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
)

// Filter is the part of the ext_proc filter config that shapes the exchange.
type Filter struct {
	Mode              *filterv3.ProcessingMode
	AllowModeOverride bool
	FailureModeAllow  bool
	// MessageTimeout is how long Envoy waits for each reply (default 200ms).
	MessageTimeout time.Duration
	// MaxMessageTimeout bounds override_message_timeout; 0 disables it.
	MaxMessageTimeout time.Duration
	// BufferLimit is the request body buffer limit; a larger body is
	// answered 413 by Envoy itself. 0 means no limit.
	BufferLimit int
	// ClusterHeader is the route's cluster_header.
	ClusterHeader string
	// Metadata is the grpc_service's initial_metadata, sent on every
	// ext_proc stream.
	Metadata map[string]string
	// Clock runs the message timer; nil is the real one. A test whose
	// outcome must not depend on how fast the machine answers gives it a
	// clockwork.FakeClock, which fires only when the test advances it
	// (then every reply comes "in time"), and advances it where the timer
	// is what it tests.
	Clock clockwork.Clock
}

// FilterFrom reads a Filter from an ext_proc filter config, with Envoy's
// defaults where the config is silent.
func FilterFrom(ep *filterv3.ExternalProcessor) Filter {
	f := Filter{
		Mode:              proto.Clone(ep.GetProcessingMode()).(*filterv3.ProcessingMode),
		AllowModeOverride: ep.GetAllowModeOverride(),
		FailureModeAllow:  ep.GetFailureModeAllow(),
		MessageTimeout:    200 * time.Millisecond, // config.h DEFAULT_MESSAGE_TIMEOUT_MS
		MaxMessageTimeout: ep.GetMaxMessageTimeout().AsDuration(),
		ClusterHeader:     "x-vgw-cluster",
	}
	if f.Mode == nil {
		f.Mode = &filterv3.ProcessingMode{}
	}
	if t := ep.GetMessageTimeout(); t != nil {
		f.MessageTimeout = t.AsDuration()
	}
	for _, h := range ep.GetGrpcService().GetInitialMetadata() {
		if f.Metadata == nil {
			f.Metadata = map[string]string{}
		}
		f.Metadata[h.GetKey()] = h.GetValue()
	}
	return f
}

// Request is the client's HTTP request.
type Request struct {
	Method  string // default POST
	Path    string // default /v1/chat/completions
	Headers []Header
	Body    []byte
	// Chunked sends the body without a content-length header.
	Chunked bool
	// Trailers end the request after its body, as an HTTP/2 (or h2c)
	// client may send them.
	Trailers []Header
	// ResetAfter names a message ("request_headers", "request_body",
	// "response_headers", "response_body"): once Envoy has sent it, the
	// client goes away before the processor answers, and Envoy resets the
	// ext_proc stream (ext_proc.cc onDestroy).
	ResetAfter string
}

// Header is one HTTP header.
type Header struct{ Key, Value string }

// Forwarded is the request as the upstream receives it.
type Forwarded struct {
	Cluster string
	Headers []Header
	Body    []byte
}

// Get returns the first value of a header.
func (f *Forwarded) Get(key string) string { return get(f.Headers, key) }

// Response is what the upstream answers.
type Response struct {
	Status  int
	Headers []Header
	Body    []byte
	// Stream, when set, delivers the body in chunks after Body, as a
	// streamed (SSE) response does; closing it ends the response.
	Stream <-chan []byte
	// StreamErr, read once Stream is closed, says why it closed: nil for
	// the end of the response, else the upstream reset mid-body. Envoy
	// then resets the downstream stream and destroys the filter chain,
	// which closes the ext_proc stream (router.cc onUpstreamReset after
	// response headers: "upstream_reset_after_response_started").
	StreamErr func() error
	Trailers  []Header
}

// Upstream stands for the clusters Envoy routes to. An error is a failed
// connection, which Envoy answers with a local 503.
type Upstream func(ctx context.Context, req *Forwarded) (*Response, error)

// Result is what the client got, and how.
type Result struct {
	Status  int
	Headers []Header
	Body    []byte
	// Immediate says the ext_proc server answered (ImmediateResponse).
	Immediate bool
	// Details is Envoy's response code detail for a local reply.
	Details string
	// Forwarded is what the upstream received; nil if nothing was sent.
	Forwarded *Forwarded
	// Overrides are the message timeouts the server asked for and Envoy accepted.
	Overrides []time.Duration
	// ClientReset says the client went away before the response ended.
	ClientReset bool
	// UpstreamReset says the upstream failed mid-body: the client got the
	// status and part of the body, then a reset, as from Envoy.
	UpstreamReset bool
	// Bypassed says the server ended the stream with OK and Envoy went on
	// without it (ext_proc.cc onGrpcClose).
	Bypassed bool
	// Sent lists the messages Envoy sent the processor, by kind.
	Sent []string
}

// Get returns the first value of a response header.
func (r *Result) Get(key string) string { return get(r.Headers, key) }

func get(hs []Header, key string) string {
	for _, h := range hs {
		if h.Key == key {
			return h.Value
		}
	}
	return ""
}

// Envoy is one Envoy's ext_proc filter and router.
type Envoy struct {
	client   extprocv3.ExternalProcessorClient
	filter   Filter
	upstream Upstream
	// overrides counts the override_message_timeout replies accepted on
	// every stream so far, for a test that must know one has arrived.
	overrides atomic.Int64
}

// Overrides is how many override_message_timeout replies this Envoy has
// accepted, on all its streams.
func (e *Envoy) Overrides() int { return int(e.overrides.Load()) }

// New returns an Envoy that calls the ext_proc server on conn.
func New(conn grpc.ClientConnInterface, f Filter, up Upstream) *Envoy {
	return &Envoy{client: extprocv3.NewExternalProcessorClient(conn), filter: f, upstream: up}
}

// Details Envoy reports for its own local replies.
const (
	DetailMessageTimeout = "ext_proc_error_per-message_timeout_exceeded" // ext_proc.cc onMessageTimeout
	DetailGrpcError      = "ext_proc_error_gRPC_error"                   // ext_proc.cc onGrpcError
	DetailSpurious       = "ext_proc_spurious_message"
	DetailBodyTooLarge   = "request_payload_too_large" // filter_manager.cc buffer overflow
	DetailNoCluster      = "cluster_not_found"         // router.cc, flag NC
	DetailNoUpstream     = "no_healthy_upstream"       // router.cc, flag UH
	DetailUpstreamReset  = "upstream_reset_after_response_started"
)

// exchange is one request's ext_proc stream.
type exchange struct {
	e       *Envoy
	stream  extprocv3.ExternalProcessor_ProcessClient
	ctx     context.Context // the stream's; done once Envoy closes it
	cancel  context.CancelFunc
	replies chan reply
	mode    *filterv3.ProcessingMode
	res     *Result
	closed  bool
	// bypass: the server ended the stream with OK; Envoy carries on
	// without ext_proc for the rest of the request.
	bypass     bool
	sentFirst  bool
	resetAfter string // see Request.ResetAfter
}

type reply struct {
	r   *extprocv3.ProcessingResponse
	err error
}

// Do carries req through Envoy. It returns an error only when the harness
// itself fails; everything Envoy would answer is in the Result. Cancelling
// ctx is the client going away.
func (e *Envoy) Do(ctx context.Context, req Request) (*Result, error) {
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	for k, v := range e.filter.Metadata {
		sctx = metadata.AppendToOutgoingContext(sctx, k, formatMetadata(v))
	}
	res := &Result{}
	stream, err := e.client.Process(sctx)
	if err != nil {
		return e.failClosed(res, DetailGrpcError), nil
	}
	x := &exchange{e: e, stream: stream, ctx: sctx, cancel: cancel, replies: make(chan reply, 4), resetAfter: req.ResetAfter,
		mode: proto.Clone(e.filter.Mode).(*filterv3.ProcessingMode), res: res}
	go x.receive()
	defer x.close() // onDestroy

	if req.Method == "" {
		req.Method = "POST"
	}
	if req.Path == "" {
		req.Path = "/v1/chat/completions"
	}
	headers := []Header{{":method", req.Method}, {":path", req.Path}, {":authority", "vgw.test"}, {":scheme", "http"}}
	if len(req.Body) > 0 && !req.Chunked {
		headers = append(headers, Header{"content-length", strconv.Itoa(len(req.Body))})
	}
	headers = append(headers, req.Headers...)
	routeCluster := get(headers, e.filter.ClusterHeader) // the route as first resolved

	// Request headers.
	if x.mode.GetRequestHeaderMode() != filterv3.ProcessingMode_SKIP && !x.bypass {
		r, done := x.call(ctx, &extprocv3.ProcessingRequest{
			Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
				Headers: headerMap(headers), EndOfStream: len(req.Body) == 0 && len(req.Trailers) == 0}},
		}, kindRequestHeaders)
		if done {
			return res, nil
		}
		if r != nil {
			c := r.GetRequestHeaders().GetResponse()
			headers = mutate(headers, c.GetHeaderMutation())
			if c.GetClearRouteCache() && c.GetHeaderMutation() != nil {
				routeCluster = get(headers, e.filter.ClusterHeader)
			}
			x.overrideMode(r.GetModeOverride())
		}
	}

	// Request body.
	body := req.Body
	if len(body) > 0 && !x.bypass {
		switch x.mode.GetRequestBodyMode() {
		case filterv3.ProcessingMode_NONE:
		case filterv3.ProcessingMode_BUFFERED:
			if e.filter.BufferLimit > 0 && len(body) > e.filter.BufferLimit {
				// filter_manager.cc: a decoder buffer over its limit is 413.
				return localReply(res, 413, DetailBodyTooLarge), nil
			}
			// A request that ends with trailers has its whole body sent
			// without end_of_stream, as decodeTrailers sends the buffered
			// body (ext_proc.cc onTrailers); the trailers follow only in
			// request_trailer_mode SEND.
			r, done := x.call(ctx, &extprocv3.ProcessingRequest{
				Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: body, EndOfStream: len(req.Trailers) == 0}},
			}, kindRequestBody)
			if done {
				return res, nil
			}
			if r != nil {
				c := r.GetRequestBody().GetResponse()
				headers = mutate(headers, c.GetHeaderMutation())
				if c.GetClearRouteCache() && c.GetHeaderMutation() != nil {
					routeCluster = get(headers, e.filter.ClusterHeader)
				}
			}
		default:
			return nil, errors.New("extproctest: request_body_mode " + x.mode.GetRequestBodyMode().String() + " is not played")
		}
	}
	if len(req.Trailers) > 0 && x.mode.GetRequestTrailerMode() == filterv3.ProcessingMode_SEND && !x.bypass {
		if _, done := x.call(ctx, &extprocv3.ProcessingRequest{
			Request: &extprocv3.ProcessingRequest_RequestTrailers{RequestTrailers: &extprocv3.HttpTrailers{Trailers: headerMap(req.Trailers)}},
		}, kindRequestTrailers); done {
			return res, nil
		}
	}

	// Router.
	var up *Response
	if routeCluster == "" {
		up = &Response{Status: 503, Body: []byte("cluster not found")} // router.cc: NC
		res.Details = DetailNoCluster
	} else {
		fwd := &Forwarded{Cluster: routeCluster, Headers: headers, Body: body}
		res.Forwarded = fwd
		var err error
		up, err = e.upstream(ctx, fwd)
		if err != nil {
			up = &Response{Status: 503, Body: []byte("no healthy upstream")} // router.cc: UH/UF
			res.Details = DetailNoUpstream
		}
	}
	if ctx.Err() != nil {
		res.ClientReset = true
		return res, nil
	}

	// Response headers. A local reply from the router passes the encoder
	// filters like any response (filter_manager.cc).
	respHeaders := append([]Header{{":status", strconv.Itoa(up.Status)}}, up.Headers...)
	endAtHeaders := len(up.Body) == 0 && up.Stream == nil && len(up.Trailers) == 0
	if x.mode.GetResponseHeaderMode() != filterv3.ProcessingMode_SKIP && !x.bypass {
		r, done := x.call(ctx, &extprocv3.ProcessingRequest{
			Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{
				Headers: headerMap(respHeaders), EndOfStream: endAtHeaders}},
		}, kindResponseHeaders)
		if done {
			return res, nil
		}
		if r != nil {
			respHeaders = mutate(respHeaders, r.GetResponseHeaders().GetResponse().GetHeaderMutation())
			x.overrideMode(r.GetModeOverride())
		}
	}
	res.Status, _ = strconv.Atoi(get(respHeaders, ":status"))
	for _, h := range respHeaders {
		if !strings.HasPrefix(h.Key, ":") {
			res.Headers = append(res.Headers, h)
		}
	}
	x.maybeCloseAfterHeaders(endAtHeaders, len(up.Trailers) > 0)

	// Response body.
	bodyMode := x.mode.GetResponseBodyMode()
	if x.bypass || x.closed {
		bodyMode = filterv3.ProcessingMode_NONE
	}
	if bodyMode != filterv3.ProcessingMode_NONE && bodyMode != filterv3.ProcessingMode_STREAMED {
		return nil, errors.New("extproctest: response_body_mode " + bodyMode.String() + " is not played")
	}
	chunks := [][]byte{}
	if len(up.Body) > 0 {
		chunks = append(chunks, up.Body)
	}
	lastChunk := up.Stream == nil && len(up.Trailers) == 0
	for i, c := range chunks {
		if bodyMode == filterv3.ProcessingMode_STREAMED {
			if _, done := x.call(ctx, responseBody(c, lastChunk && i == len(chunks)-1), kindResponseBody); done {
				return res, nil
			}
		}
		res.Body = append(res.Body, c...)
	}
	if up.Stream != nil {
	stream:
		for {
			select {
			case c, ok := <-up.Stream:
				if !ok {
					if up.StreamErr != nil && up.StreamErr() != nil {
						res.UpstreamReset, res.Details = true, DetailUpstreamReset
						return res, nil // the deferred close is onDestroy
					}
					break stream
				}
				if bodyMode == filterv3.ProcessingMode_STREAMED {
					if _, done := x.call(ctx, responseBody(c, false), kindResponseBody); done {
						return res, nil
					}
				}
				res.Body = append(res.Body, c...)
			case <-ctx.Done():
				res.ClientReset = true
				return res, nil
			}
		}
		if bodyMode == filterv3.ProcessingMode_STREAMED && len(up.Trailers) == 0 {
			// The end of a stream without trailers is an empty end_of_stream chunk.
			if _, done := x.call(ctx, responseBody(nil, true), kindResponseBody); done {
				return res, nil
			}
		}
	}
	if bodyMode == filterv3.ProcessingMode_STREAMED && len(up.Trailers) == 0 {
		x.closeEarly() // STREAMED: closed at the end_of_stream chunk (ext_proc.cc)
	}

	// Response trailers: only real ones; Envoy synthesises none since 1.28.
	if len(up.Trailers) > 0 && x.mode.GetResponseTrailerMode() == filterv3.ProcessingMode_SEND && !x.bypass && !x.closed {
		if _, done := x.call(ctx, &extprocv3.ProcessingRequest{
			Request: &extprocv3.ProcessingRequest_ResponseTrailers{ResponseTrailers: &extprocv3.HttpTrailers{Trailers: headerMap(up.Trailers)}},
		}, kindResponseTrailers); done {
			return res, nil
		}
		x.closeEarly()
	}
	return res, nil
}

func responseBody(b []byte, eos bool) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: &extprocv3.HttpBody{Body: b, EndOfStream: eos}}}
}

// maybeCloseAfterHeaders plays Envoy 1.37's early close after the response
// headers reply (ext_proc.cc, processor_state.cc): with no body processing,
// the stream closes now if no trailers phase is configured, or if the
// response already ended at its headers.
func (x *exchange) maybeCloseAfterHeaders(endAtHeaders, hasTrailers bool) {
	if x.mode.GetResponseBodyMode() != filterv3.ProcessingMode_NONE {
		return
	}
	if x.mode.GetResponseTrailerMode() != filterv3.ProcessingMode_SEND || (endAtHeaders && !hasTrailers) {
		x.closeEarly()
	}
}

type kind int

const (
	kindRequestHeaders kind = iota
	kindRequestBody
	kindRequestTrailers
	kindResponseHeaders
	kindResponseBody
	kindResponseTrailers
)

var kindNames = [...]string{"request_headers", "request_body", "request_trailers", "response_headers", "response_body", "response_trailers"}

func (k kind) String() string { return kindNames[k] }

func (k kind) matches(r *extprocv3.ProcessingResponse) bool {
	switch r.GetResponse().(type) {
	case *extprocv3.ProcessingResponse_RequestHeaders:
		return k == kindRequestHeaders
	case *extprocv3.ProcessingResponse_RequestBody:
		return k == kindRequestBody
	case *extprocv3.ProcessingResponse_RequestTrailers:
		return k == kindRequestTrailers
	case *extprocv3.ProcessingResponse_ResponseHeaders:
		return k == kindResponseHeaders
	case *extprocv3.ProcessingResponse_ResponseBody:
		return k == kindResponseBody
	case *extprocv3.ProcessingResponse_ResponseTrailers:
		return k == kindResponseTrailers
	}
	return false
}

func (x *exchange) receive() {
	for {
		r, err := x.stream.Recv()
		select {
		case x.replies <- reply{r, err}:
		case <-x.ctx.Done():
			return
		}
		if err != nil {
			return
		}
	}
}

// call sends one message and waits for its reply under Envoy's message
// timeout. It returns done when the request has been answered without the
// upstream (immediate response, timeout, error), and a nil reply when
// Envoy goes on without the processor.
func (x *exchange) call(ctx context.Context, msg *extprocv3.ProcessingRequest, want kind) (*extprocv3.ProcessingResponse, bool) {
	if !x.sentFirst {
		// The first message carries the body modes (ext_proc.cc, protocol_config).
		msg.ProtocolConfig = &extprocv3.ProtocolConfiguration{
			RequestBodyMode:  x.mode.GetRequestBodyMode(),
			ResponseBodyMode: x.mode.GetResponseBodyMode(),
		}
		x.sentFirst = true
	}
	if err := x.stream.Send(msg); err != nil {
		return nil, x.fail(DetailGrpcError)
	}
	x.res.Sent = append(x.res.Sent, want.String())
	if x.resetAfter == want.String() {
		x.cancel() // a reset, not a half-close
		x.res.ClientReset = true
		return nil, true
	}
	f := x.e.filter
	clock := f.Clock
	if clock == nil {
		clock = clockwork.NewRealClock()
	}
	timer := clock.NewTimer(f.MessageTimeout)
	defer timer.Stop()
	overridden := false
	for {
		select {
		case <-ctx.Done():
			x.res.ClientReset = true
			return nil, true
		case <-timer.Chan():
			// ext_proc.cc onMessageTimeout: 504 when failing closed; when
			// failing open, the stream is closed and the request goes on.
			if f.FailureModeAllow {
				x.bypass = true
				x.closeEarly()
				return nil, false
			}
			return nil, x.fail(DetailMessageTimeout)
		case rp := <-x.replies:
			if errors.Is(rp.err, io.EOF) {
				// The server returned OK: Envoy carries on without it, even
				// failing closed (ext_proc.cc onGrpcClose).
				x.bypass, x.res.Bypassed = true, true
				return nil, false
			}
			if rp.err != nil {
				if f.FailureModeAllow {
					x.bypass = true
					x.closeEarly()
					return nil, false
				}
				return nil, x.fail(DetailGrpcError)
			}
			r := rp.r
			if d := r.GetOverrideMessageTimeout(); d != nil {
				// Accepted once per phase, within [1ms, max_message_timeout],
				// and it only restarts the timer (processor_state.cc,
				// ext_proc.cc handleMessageTimeoutOverride).
				v := d.AsDuration()
				if !overridden && f.MaxMessageTimeout > 0 && v >= time.Millisecond && v <= f.MaxMessageTimeout {
					overridden = true
					x.res.Overrides = append(x.res.Overrides, v)
					timer.Reset(v)
					x.e.overrides.Add(1)
				}
				continue
			}
			if ir := r.GetImmediateResponse(); ir != nil {
				x.immediate(ir)
				return nil, true
			}
			if !want.matches(r) {
				return nil, x.fail(DetailSpurious)
			}
			return r, false
		}
	}
}

// immediate plays a local reply from an ImmediateResponse (ext_proc.cc
// sendImmediateResponse; status below 200 becomes 200; text/plain only when
// no content-type was set, utility.cc).
func (x *exchange) immediate(ir *extprocv3.ImmediateResponse) {
	status := int(ir.GetStatus().GetCode())
	if status < 200 {
		status = 200
	}
	x.res.Immediate = true
	x.res.Status = status
	x.res.Details = ir.GetDetails()
	x.res.Headers = mutate(nil, ir.GetHeaders())
	if get(x.res.Headers, "content-type") == "" && len(ir.GetBody()) > 0 {
		x.res.Headers = append(x.res.Headers, Header{"content-type", "text/plain"})
	}
	x.res.Body = ir.GetBody()
	x.closeEarly()
}

func (x *exchange) fail(detail string) bool {
	localReply(x.res, 500, detail)
	if detail == DetailMessageTimeout {
		x.res.Status = 504
	}
	x.closeEarly()
	return true
}

func (e *Envoy) failClosed(res *Result, detail string) *Result {
	if e.filter.FailureModeAllow {
		res.Bypassed = true
	}
	return localReply(res, 500, detail)
}

func localReply(res *Result, status int, detail string) *Result {
	res.Status, res.Details = status, detail
	res.Body = []byte(detail)
	res.Headers = []Header{{"content-type", "text/plain"}}
	return res
}

// overrideMode applies a mode override as ext_proc.cc does: only when the
// filter allows it, DEFAULT header modes leave the current ones, and both
// body modes are copied as given.
func (x *exchange) overrideMode(m *filterv3.ProcessingMode) {
	if m == nil || !x.e.filter.AllowModeOverride {
		return
	}
	if v := m.GetRequestHeaderMode(); v != filterv3.ProcessingMode_DEFAULT {
		x.mode.RequestHeaderMode = v
	}
	if v := m.GetResponseHeaderMode(); v != filterv3.ProcessingMode_DEFAULT {
		x.mode.ResponseHeaderMode = v
	}
	if v := m.GetRequestTrailerMode(); v != filterv3.ProcessingMode_DEFAULT {
		x.mode.RequestTrailerMode = v
	}
	if v := m.GetResponseTrailerMode(); v != filterv3.ProcessingMode_DEFAULT {
		x.mode.ResponseTrailerMode = v
	}
	x.mode.RequestBodyMode = m.GetRequestBodyMode()
	x.mode.ResponseBodyMode = m.GetResponseBodyMode()
}

// closeEarly closes the stream the way Envoy does: END_STREAM, then an
// immediate RST_STREAM (grpc_client_impl.h close()).
func (x *exchange) closeEarly() {
	if x.closed {
		return
	}
	x.closed = true
	_ = x.stream.CloseSend()
	x.cancel()
}

// close is onDestroy: the HTTP stream is gone (ext_proc.cc onDestroy).
func (x *exchange) close() { x.closeEarly() }

// headerMap encodes headers as Envoy sends them: values in raw_value
// (mutation_utils.cc headersToProto).
func headerMap(hs []Header) *corev3.HeaderMap {
	m := &corev3.HeaderMap{Headers: make([]*corev3.HeaderValue, 0, len(hs))}
	for _, h := range hs {
		m.Headers = append(m.Headers, &corev3.HeaderValue{Key: h.Key, RawValue: []byte(h.Value)})
	}
	return m
}

// mutate applies a header mutation as Envoy does: raw_value only
// (mutation_utils.cc applyHeaderMutations), set replaces unless append is
// true, and x-envoy-* and :authority are left alone (the default mutation
// rules).
func mutate(hs []Header, m *extprocv3.HeaderMutation) []Header {
	if m == nil {
		return hs
	}
	allowed := func(k string) bool { return !strings.HasPrefix(k, "x-envoy-") && k != ":authority" && k != "host" }
	for _, k := range m.GetRemoveHeaders() {
		if !allowed(k) || strings.HasPrefix(k, ":") {
			continue
		}
		hs = remove(hs, k)
	}
	for _, o := range m.GetSetHeaders() {
		k, v := strings.ToLower(o.GetHeader().GetKey()), string(o.GetHeader().GetRawValue())
		if !allowed(k) {
			continue
		}
		//lint:ignore SA1019 ext_proc's mutation code reads the deprecated append field (mutation_utils.cc).
		if !o.GetAppend().GetValue() {
			hs = remove(hs, k)
		}
		hs = append(hs, Header{k, v})
	}
	return hs
}

func remove(hs []Header, key string) []Header {
	out := hs[:0:0]
	for _, h := range hs {
		if h.Key != key {
			out = append(out, h)
		}
	}
	return out
}

// formatMetadata fills in a metadata value as Envoy does for each ext_proc
// stream: initial_metadata goes through a header parser with the request's
// stream info (source/common/grpc/async_client_impl.cc, evaluateHeaders;
// ext_proc.cc sets the parent context), so substitution commands work.
// The one vgw's bootstraps use is HOSTNAME (gethostname(),
// source/common/formatter/stream_info_formatter.cc).
func formatMetadata(v string) string {
	if !strings.Contains(v, "%HOSTNAME%") {
		return v
	}
	host, _ := os.Hostname()
	return strings.ReplaceAll(v, "%HOSTNAME%", host)
}
