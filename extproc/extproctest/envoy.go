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
	"slices"
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
	// StreamIdleTimeout is the connection manager's stream_idle_timeout
	// (or the route's idle_timeout, which replaces it); 0 is none. It
	// restarts whenever request data passes a filter and whenever response
	// headers or data enter the encoder filters (filter_manager.cc
	// decodeData, encodeHeaders, encodeData; conn_manager_impl.cc at the
	// request headers), so between the request's last byte and the
	// response's first it runs twice: while the processor holds the
	// request, and again from the processor's answer (the body moving on
	// to the router) to the upstream's first byte.
	StreamIdleTimeout time.Duration
	// StripHeader, when set, says which request headers the connection
	// manager removes as the request arrives, before it picks the route
	// (early_header_mutation_extensions): neither the route, the
	// processor nor the upstream sees them.
	StripHeader func(key string) bool
	// RouteFor, when set, is the route table: what the route a request's
	// :path takes does with it. Unset, every request takes one route that
	// forwards by ClusterHeader, with BufferLimit.
	RouteFor func(path string) Route
	// LocalReply, when set, rewrites Envoy's local replies (the
	// connection manager's local_reply_config, local_reply.cc): given a
	// reply's status, response code details and body, it returns the
	// status, body and content type the client gets instead, and false
	// when no mapper takes the reply.
	LocalReply func(status int, details string, body []byte) (int, []byte, string, bool)
	// Clock runs the message and idle timers; nil is the real one. A test whose
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

// Route is what a route does with the requests it takes.
type Route struct {
	// Direct, when set, is the route's direct_response: the router
	// answers the request itself (details "direct_response").
	Direct *Response
	// NoExtProc says the route turns the ext_proc filter off
	// (ExtProcPerRoute disabled): the processor never hears of the
	// request.
	NoExtProc bool
	// BufferLimit is its request body buffer limit; 0 means none.
	BufferLimit int
}

// DetailDirectResponse is the response code details of a route's
// direct_response (router.cc).
const DetailDirectResponse = "direct_response"

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
	// Bypassed says Envoy went on without the processor: the server ended
	// the stream with OK (ext_proc.cc onGrpcClose), or, failing open, the
	// stream failed.
	Bypassed bool
	// TimedOut says Envoy's stream idle timer ended the request: before
	// the response began, with a local 504 (Details stream_idle_timeout,
	// unless the processor then failed to answer its response_headers);
	// after, with a reset.
	TimedOut bool
	// Sent lists the messages Envoy sent the processor, by kind.
	Sent []string
	// Closed says when Envoy closed the ext_proc stream: after the
	// processor's answer to the message named (or its failure to answer),
	// or "destroy" when the HTTP stream ended first (ext_proc.cc
	// onDestroy). "" when no stream was open.
	Closed string
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
	// DetailMutationMismatch is a replaced body whose length differs from
	// the request's content-length: processor_state.cc
	// validateContentLength's error, which ext_proc.cc handleErrorResponse
	// answers with status_on_error (500), its message as the details,
	// spaces made underscores (sendImmediateResponse).
	DetailMutationMismatch = "mismatch_between_content_length_and_the_length_of_the_mutated_body"
	DetailBodyTooLarge     = "request_payload_too_large" // filter_manager.cc buffer overflow
	DetailNoCluster        = "cluster_not_found"         // router.cc, flag NC
	DetailNoUpstream       = "no_healthy_upstream"       // router.cc, flag UH
	DetailUpstreamReset    = "upstream_reset_after_response_started"
	DetailIdleTimeout      = "stream_idle_timeout" // conn_manager_impl.cc onIdleTimeout
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
	// clock runs the timers; idle is the stream idle timer, nil when the
	// filter sets none.
	clock clockwork.Clock
	idle  clockwork.Timer
	// reqDone: the request direction has had its last reply
	// (decoding_state_.noMoreExternalProcess); the stream closes early only
	// once both directions are done.
	reqDone bool
	// cancelUpstream resets the upstream request; a no-op until there is one.
	cancelUpstream context.CancelFunc
	// stale is a request-side message whose reply may still come after a
	// local reply overtook it; the harness takes it and goes no further
	// (see idleDuringCall). -1 when there is none.
	stale kind
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
	x := &exchange{e: e, ctx: sctx, cancel: cancel, replies: make(chan reply, 4), resetAfter: req.ResetAfter,
		mode: proto.Clone(e.filter.Mode).(*filterv3.ProcessingMode), res: res, clock: e.filter.Clock, stale: -1,
		cancelUpstream: func() {}}
	if x.clock == nil {
		x.clock = clockwork.NewRealClock()
	}
	// The client sends its whole request at once: the idle timer runs
	// from here (conn_manager_impl.cc resets it at decodeHeaders'
	// end, filter_manager.cc at each body chunk).
	if t := e.filter.StreamIdleTimeout; t > 0 {
		x.idle = x.clock.NewTimer(t)
		defer x.idle.Stop()
	}
	if req.Method == "" {
		req.Method = "POST"
	}
	if req.Path == "" {
		req.Path = "/v1/chat/completions"
	}
	route := Route{BufferLimit: e.filter.BufferLimit}
	if e.filter.RouteFor != nil {
		route = e.filter.RouteFor(req.Path)
	}
	if route.NoExtProc {
		// ext_proc.cc: a filter disabled for the route does nothing.
		if route.Direct == nil {
			return nil, errors.New("extproctest: a route without ext_proc that forwards is not played")
		}
		x.bypass, x.closed = true, true
		return x.respond(ctx, route.Direct, DetailDirectResponse)
	}
	stream, err := e.client.Process(sctx)
	if err != nil {
		if !e.filter.FailureModeAllow {
			return e.localReply(res, 500, DetailGrpcError), nil
		}
		// Failing open, a stream that cannot be opened is as good as none:
		// the request goes on unprocessed (ext_proc.cc openStream).
		x.bypass, x.closed, res.Bypassed = true, true, true
	} else {
		x.stream = stream
		go x.receive()
		defer x.close() // onDestroy
	}

	headers := []Header{{":method", req.Method}, {":path", req.Path}, {":authority", "vgw.test"}, {":scheme", "http"}}
	if len(req.Body) > 0 && !req.Chunked {
		headers = append(headers, Header{"content-length", strconv.Itoa(len(req.Body))})
	}
	headers = append(headers, req.Headers...)
	if e.filter.StripHeader != nil {
		headers = slices.DeleteFunc(headers, func(h Header) bool { return e.filter.StripHeader(h.Key) })
	}
	routeCluster := get(headers, e.filter.ClusterHeader) // the route as first resolved (conn_manager_impl.cc decodeHeaders)

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
		// processor_state.cc isLastResponseAfterHeaderResp: the whole
		// request is in by now (the client sent it at once).
		sendTrailers := x.mode.GetRequestTrailerMode() == filterv3.ProcessingMode_SEND
		hasTrailers := len(req.Trailers) > 0
		switch {
		case len(req.Body) == 0 && !hasTrailers:
			x.requestDone()
		case x.mode.GetRequestBodyMode() == filterv3.ProcessingMode_NONE && (!sendTrailers || !hasTrailers):
			x.requestDone()
		case x.mode.GetRequestBodyMode() != filterv3.ProcessingMode_NONE && !sendTrailers && hasTrailers && len(req.Body) == 0:
			// With a body, Envoy sends it now (handleCompleteBodyAvailable):
			// the state is not idle, so the headers' reply is not the last.
			x.requestDone()
		}
	} else if x.mode.GetRequestBodyMode() == filterv3.ProcessingMode_NONE && x.mode.GetRequestTrailerMode() != filterv3.ProcessingMode_SEND {
		x.reqDone = true // no request processing configured (noExternalProcess)
	}

	// Request body.
	body := req.Body
	if len(body) > 0 && !x.bypass {
		switch x.mode.GetRequestBodyMode() {
		case filterv3.ProcessingMode_NONE:
		case filterv3.ProcessingMode_BUFFERED:
			if route.BufferLimit > 0 && len(body) > route.BufferLimit {
				// filter_manager.cc: a decoder buffer over its limit is a
				// local 413, which passes the encoder filters, ext_proc's
				// response_headers included (sendLocalReplyViaFilterChain).
				return x.respond(ctx, &Response{Status: 413, Body: []byte("Payload Too Large")}, DetailBodyTooLarge)
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
				if m := c.GetBodyMutation(); m != nil {
					// processor_state.cc handleBufferedBodyCallback: the
					// header mutation first, then a replaced body must
					// match the content-length the headers then say
					// (validateContentLength), or the request fails with
					// Envoy's 500.
					if m.GetClearBody() {
						body = nil
					} else {
						body = m.GetBody()
					}
					if cl := get(headers, "content-length"); cl != "" && cl != strconv.Itoa(len(body)) {
						x.closeEarly()
						return e.localReply(res, 500, DetailMutationMismatch), nil
					}
				}
			}
			// A buffered body's reply is the direction's last only when
			// trailers came that are not sent (isLastResponseAfterBodyResp;
			// eosSeenInBody is false for BUFFERED).
			if len(req.Trailers) > 0 && x.mode.GetRequestTrailerMode() != filterv3.ProcessingMode_SEND {
				x.requestDone()
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
		x.requestDone()
	}

	// Router.
	if route.Direct != nil {
		return x.respond(ctx, route.Direct, DetailDirectResponse)
	}
	if routeCluster == "" {
		// router.cc: NC.
		return x.respond(ctx, &Response{Status: 503, Body: []byte("cluster not found")}, DetailNoCluster)
	}
	fwd := &Forwarded{Cluster: routeCluster, Headers: headers, Body: body}
	res.Forwarded = fwd
	if len(body) > 0 {
		// The body moves on past the processor to the router: each
		// filter's decodeData restarts the idle timer (filter_manager.cc
		// decodeData, run by commonContinue's doData once the processor
		// answered).
		x.resetIdle()
	}
	uctx, cancelUpstream := context.WithCancel(ctx)
	defer cancelUpstream() // the upstream request lasts as long as the response
	x.cancelUpstream = cancelUpstream
	up, err := x.forward(uctx, fwd)
	switch {
	case ctx.Err() != nil:
		res.ClientReset = true
		return res, nil
	case errors.Is(err, errIdle):
		// The router's upstream request is reset and the local 504 passes
		// the encoder filters (conn_manager_impl.cc onIdleTimeout; the
		// request is complete, so 504: utility.cc maybeRequestTimeoutCode).
		res.TimedOut = true
		return x.respond(ctx, idleReply(), DetailIdleTimeout)
	case err != nil:
		// router.cc: UH/UF.
		return x.respond(ctx, &Response{Status: 503, Body: []byte("no healthy upstream")}, DetailNoUpstream)
	}
	return x.respond(ctx, up, "")
}

// errIdle is the stream idle timer running out.
var errIdle = errors.New("stream idle timeout")

func idleReply() *Response { return &Response{Status: 504, Body: []byte("stream timeout")} }

// forward sends the request upstream and waits for the response's
// headers, for as long as the idle timer allows. ctx is the upstream
// request's; an Upstream must return once it ends, as a reset ends the
// request to the real upstream.
func (x *exchange) forward(ctx context.Context, fwd *Forwarded) (*Response, error) {
	if x.idle == nil {
		return x.e.upstream(ctx, fwd)
	}
	type answer struct {
		r   *Response
		err error
	}
	done := make(chan answer, 1)
	go func() {
		r, err := x.e.upstream(ctx, fwd)
		done <- answer{r, err}
	}()
	select {
	case a := <-done:
		return a.r, a.err
	case <-x.idle.Chan():
		x.cancelUpstream()
		<-done
		return nil, errIdle
	}
}

// resetIdle restarts the idle timer, dropping a fire no one read: a fake
// clock's timer keeps it in its channel across a Reset.
func (x *exchange) resetIdle() {
	if x.idle == nil {
		return
	}
	if !x.idle.Stop() {
		select {
		case <-x.idle.Chan():
		default:
		}
	}
	x.idle.Reset(x.e.filter.StreamIdleTimeout)
}

// respond carries a response, the upstream's or Envoy's own local reply
// (detail names it; "" for the upstream's), through the encoder filters
// to the client. A local reply passes them like any response
// (filter_manager.cc sendLocalReplyViaFilterChain), so ext_proc sends its
// response_headers.
func (x *exchange) respond(ctx context.Context, up *Response, detail string) (*Result, error) {
	res := x.res
	contentType := "text/plain" // utility.cc sendLocalReply, unless the reply has one
	if detail != "" {
		res.Details = detail
		if get(up.Headers, "content-type") != "" {
			contentType = ""
		}
		if status, body, ct, ok := x.e.rewrite(up.Status, detail, up.Body); ok {
			up = &Response{Status: status, Body: body, Headers: slices.DeleteFunc(slices.Clone(up.Headers), func(h Header) bool { return h.Key == "content-type" })}
			contentType = ct
		}
	}
	x.resetIdle() // filter_manager.cc encodeHeaders

	// Response headers.
	respHeaders := append([]Header{{":status", strconv.Itoa(up.Status)}}, up.Headers...)
	if detail != "" && len(up.Body) > 0 && contentType != "" {
		respHeaders = append(respHeaders, Header{"content-type", contentType})
	}
	endAtHeaders := len(up.Body) == 0 && up.Stream == nil && len(up.Trailers) == 0
	replied := false
	if x.mode.GetResponseHeaderMode() != filterv3.ProcessingMode_SKIP && !x.bypass {
		replied = true
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
	// A body that is not streamed comes with the headers, in the same read
	// from the upstream, so Envoy has all of it before the processor's
	// reply can be read.
	x.maybeCloseAfterHeaders(up.Stream == nil, len(up.Trailers) > 0, replied)

	// Response body.
	bodyMode := x.mode.GetResponseBodyMode()
	if x.bypass || x.closed {
		bodyMode = filterv3.ProcessingMode_NONE
	}
	switch bodyMode {
	case filterv3.ProcessingMode_NONE, filterv3.ProcessingMode_STREAMED, filterv3.ProcessingMode_BUFFERED:
	default:
		return nil, errors.New("extproctest: response_body_mode " + bodyMode.String() + " is not played")
	}
	// BUFFERED holds the body back from the client until the processor
	// has seen all of it in one message.
	var heldBack []byte
	deliver := func(c []byte) {
		if bodyMode == filterv3.ProcessingMode_BUFFERED {
			heldBack = append(heldBack, c...)
			return
		}
		res.Body = append(res.Body, c...)
	}
	if len(up.Body) > 0 {
		if bodyMode == filterv3.ProcessingMode_STREAMED {
			if _, done := x.call(ctx, responseBody(up.Body, up.Stream == nil && len(up.Trailers) == 0), kindResponseBody); done {
				return res, nil
			}
		}
		deliver(up.Body)
	}
	if up.Stream != nil {
		var idle <-chan time.Time
		if x.idle != nil {
			idle = x.idle.Chan()
		}
	stream:
		for {
			select {
			case <-idle:
				// Mid-response the idle timer resets the stream, and with
				// it the upstream request (conn_manager_impl.cc
				// onIdleTimeout: the response has begun).
				x.cancelUpstream()
				res.TimedOut, res.Details = true, DetailIdleTimeout
				return res, nil
			case c, ok := <-up.Stream:
				if !ok {
					if up.StreamErr != nil && up.StreamErr() != nil {
						res.UpstreamReset, res.Details = true, DetailUpstreamReset
						return res, nil // the deferred close is onDestroy
					}
					break stream
				}
				x.resetIdle() // filter_manager.cc encodeData
				if bodyMode == filterv3.ProcessingMode_STREAMED {
					if _, done := x.call(ctx, responseBody(c, false), kindResponseBody); done {
						return res, nil
					}
				}
				deliver(c)
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
	if bodyMode == filterv3.ProcessingMode_STREAMED && len(up.Trailers) == 0 && x.reqDone {
		x.closeEarly() // STREAMED: closed at the end_of_stream chunk (ext_proc.cc)
	}
	if bodyMode == filterv3.ProcessingMode_BUFFERED && (len(heldBack) > 0 || len(up.Trailers) > 0) {
		// One message, end_of_stream unless trailers follow (ext_proc.cc
		// onData, onTrailers). Its reply never closes the stream: a
		// buffered body never counts as the end (ext_proc.cc eosSeenInBody
		// skips the close for BUFFERED), so the stream stays open until
		// the trailers' reply or onDestroy.
		if _, done := x.call(ctx, responseBody(heldBack, len(up.Trailers) == 0), kindResponseBody); done {
			return res, nil
		}
		res.Body = append(res.Body, heldBack...)
	}

	// Response trailers: only real ones; Envoy synthesises none since 1.28.
	if len(up.Trailers) > 0 && x.mode.GetResponseTrailerMode() == filterv3.ProcessingMode_SEND && !x.bypass && !x.closed {
		if _, done := x.call(ctx, &extprocv3.ProcessingRequest{
			Request: &extprocv3.ProcessingRequest_ResponseTrailers{ResponseTrailers: &extprocv3.HttpTrailers{Trailers: headerMap(up.Trailers)}},
		}, kindResponseTrailers); done {
			return res, nil
		}
		if x.reqDone {
			x.closeEarly()
		}
	}
	return res, nil
}

func responseBody(b []byte, eos bool) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: &extprocv3.HttpBody{Body: b, EndOfStream: eos}}}
}

// maybeCloseAfterHeaders plays Envoy 1.37's early close after the response
// headers (ext_proc.cc closeGrpcStreamIfLastRespReceived, encodeHeaders;
// processor_state.cc isLastResponseAfterHeaderResp). With no response
// processing configured at all, encodeHeaders closes the stream. Else,
// after the headers' reply, with no body processing, this direction is
// done if no trailers phase is configured, or if the whole body has
// already arrived (completeBodyAvailable) with no trailers after it; and
// the stream closes only if the request direction is done too
// (noMoreExternalProcess). Otherwise it closes later, or at onDestroy.
func (x *exchange) maybeCloseAfterHeaders(bodyComplete, hasTrailers, replied bool) {
	if x.mode.GetResponseBodyMode() != filterv3.ProcessingMode_NONE {
		return
	}
	noTrailers := x.mode.GetResponseTrailerMode() != filterv3.ProcessingMode_SEND
	if !replied {
		// encodeHeaders closes when this direction has nothing to process
		// and the request's is done too (ext_proc.cc encodeHeaders).
		if noTrailers && x.reqDone {
			x.closeEarly()
		}
		return
	}
	if x.reqDone && (noTrailers || (bodyComplete && !hasTrailers)) {
		x.closeEarly()
	}
}

// requestDone marks the request direction finished with the processor
// (processor_state.h setLastResponseForDirection); with no response
// processing configured, that ends the stream (ext_proc.cc
// closeGrpcStreamIfLastRespReceived: encoding_state_.noMoreExternalProcess).
func (x *exchange) requestDone() {
	x.reqDone = true
	if x.mode.GetResponseHeaderMode() == filterv3.ProcessingMode_SKIP && x.mode.GetResponseBodyMode() == filterv3.ProcessingMode_NONE &&
		x.mode.GetResponseTrailerMode() != filterv3.ProcessingMode_SEND {
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
	timer := x.clock.NewTimer(f.MessageTimeout)
	defer timer.Stop()
	// The idle timer can run out while a request-side call waits: the
	// local reply it makes then overtakes the call (see idleDuringCall).
	var idle <-chan time.Time
	if x.idle != nil && want <= kindRequestTrailers {
		idle = x.idle.Chan()
	}
	overridden := false
	for {
		select {
		case <-ctx.Done():
			x.res.ClientReset = true
			return nil, true
		case <-idle:
			x.idleDuringCall(ctx, want)
			return nil, true
		case <-timer.Chan():
			// ext_proc.cc onMessageTimeout: 504 when failing closed; when
			// failing open, the stream is closed and the request goes on.
			if f.FailureModeAllow {
				x.bypass, x.res.Bypassed = true, true
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
					x.bypass, x.res.Bypassed = true, true
					x.closeEarly()
					return nil, false
				}
				return nil, x.fail(DetailGrpcError)
			}
			r := rp.r
			if d := r.GetOverrideMessageTimeout(); d != nil {
				// Accepted once per message, within [1ms,
				// max_message_timeout], and it only restarts the timer
				// (processor_state.cc, ext_proc.cc
				// handleMessageTimeoutOverride).
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
			if x.stale >= 0 && x.stale.matches(r) {
				x.stale = -1 // the overtaken call's reply: no effect
				continue
			}
			if !want.matches(r) {
				if f.FailureModeAllow {
					// ext_proc.cc onReceiveMessage: a spurious message fails
					// open like an error when the filter allows it.
					x.bypass, x.res.Bypassed = true, true
					x.closeEarly()
					return nil, false
				}
				return nil, x.fail(DetailSpurious)
			}
			return r, false
		}
	}
}

// idleDuringCall plays the stream idle timer running out while a
// request-side call is pending, as when vgw holds a request in its queue
// past Envoy's stream_idle_timeout. Envoy's local 504 (the request is
// complete: utility.cc maybeRequestTimeoutCode) passes the encoder filters
// (filter_manager.cc sendLocalReplyViaFilterChain), so ext_proc sends
// response_headers on the same stream, under its own message timer,
// though the request-side reply is still owed: nothing in ext_proc.cc
// onHeaders looks at the other direction. A late reply to the pending
// call is taken and the request goes no further. That is kinder than
// Envoy may be: a local reply made from a timer does not abort the decoder
// filters (filter_manager.cc sendLocalReply aborts them only from within a
// decoder callback), so Envoy may continue decoding into the router;
// vgw never answers a request it still holds in its queue, so it meets
// this only when it admits a request in the instant the timer runs out.
// If the processor does not answer the
// response_headers in time, ext_proc's 504 goes straight to the codec
// (filter_manager.cc sendDirectLocalReply) with an empty body; failing
// open, the idle timer's own reply goes out unprocessed.
func (x *exchange) idleDuringCall(ctx context.Context, pending kind) {
	x.res.TimedOut = true
	reply := idleReply()
	x.res.Status, x.res.Details, x.res.Body = reply.Status, DetailIdleTimeout, reply.Body
	x.res.Headers = []Header{{"content-type", "text/plain"}}
	if x.mode.GetResponseHeaderMode() == filterv3.ProcessingMode_SKIP || x.bypass || x.closed {
		return
	}
	x.stale = pending
	respHeaders := []Header{{":status", strconv.Itoa(reply.Status)}, {"content-type", "text/plain"}, {"content-length", strconv.Itoa(len(reply.Body))}}
	x.idle = nil // the timer has done its work
	r, done := x.call(ctx, &extprocv3.ProcessingRequest{
		Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{Headers: headerMap(respHeaders)}},
	}, kindResponseHeaders)
	switch {
	case done && x.res.Details == DetailMessageTimeout:
		x.res.Body, x.res.Headers = nil, nil // sendDirectLocalReply with an empty body
	case done:
	case r != nil:
		x.res.Headers = nil
		for _, h := range mutate(respHeaders, r.GetResponseHeaders().GetResponse().GetHeaderMutation()) {
			if !strings.HasPrefix(h.Key, ":") {
				x.res.Headers = append(x.res.Headers, h)
			}
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
	if status, body, ct, ok := x.e.rewrite(x.res.Status, x.res.Details, x.res.Body); ok {
		x.res.Status, x.res.Body = status, body
		x.res.Headers = append(slices.DeleteFunc(x.res.Headers, func(h Header) bool { return h.Key == "content-type" }), Header{"content-type", ct})
	}
	x.closeEarly()
}

// rewrite plays local_reply_config on a local reply (Filter.LocalReply).
func (e *Envoy) rewrite(status int, details string, body []byte) (int, []byte, string, bool) {
	if e.filter.LocalReply == nil {
		return 0, nil, "", false
	}
	return e.filter.LocalReply(status, details, body)
}

func (x *exchange) fail(detail string) bool {
	status := 500
	if detail == DetailMessageTimeout {
		status = 504
	}
	x.e.localReply(x.res, status, detail)
	x.closeEarly()
	return true
}

func (e *Envoy) localReply(res *Result, status int, detail string) *Result {
	res.Status, res.Details = status, detail
	res.Body = []byte(detail)
	res.Headers = []Header{{"content-type", "text/plain"}}
	if status, body, ct, ok := e.rewrite(status, detail, res.Body); ok {
		res.Status, res.Body, res.Headers = status, body, []Header{{"content-type", ct}}
	}
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
	if x.res.Closed == "" && len(x.res.Sent) > 0 {
		x.res.Closed = x.res.Sent[len(x.res.Sent)-1]
	}
	_ = x.stream.CloseSend()
	x.cancel()
}

// close is onDestroy: the HTTP stream is gone (ext_proc.cc onDestroy).
func (x *exchange) close() {
	if !x.closed {
		x.res.Closed = "destroy"
	}
	x.closeEarly()
}

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
