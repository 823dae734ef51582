package extproc

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strconv"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Process serves one ext_proc stream, which Envoy opens for each HTTP
// request. What Envoy sends, and when it closes the stream, follows from the
// filter's processing mode; envoy/envoy.yaml sets the one vgw is built for:
//
//	request headers SEND, request body BUFFERED, request trailers SEND,
//	response headers SEND, response body NONE, response trailers SEND.
//
// With response trailers SEND and no response body processing, Envoy keeps
// the stream open until the HTTP stream is destroyed: when the response has
// been fully sent, or the client has gone (ext_proc.cc onDestroy, and the
// early-close rules in ext_proc.cc and processor_state.cc, which close
// earlier only when the response has already ended). Envoy adds no
// synthetic trailers since 1.28, so no message marks the end of a streamed
// body; the stream's end does. The slot a request holds is therefore
// released when the response headers end the stream, when trailers arrive,
// when a STREAMED body's last chunk arrives, or when the stream ends,
// whichever comes first, and exactly once.
func (s *Server) Process(srv extprocv3.ExternalProcessor_ProcessServer) error {
	st := newStream(s, srv)
	st.node = nodeOf(st.ctx)
	st.idle, _ = st.ctx.Value(idleWatchKey{}).(*idleWatch)
	defer st.close()
	for {
		req, err := st.recv()
		if err != nil {
			return endErr(err)
		}
		done, err := st.handle(req)
		if done && err == nil && st.idle.expired() {
			// The bound ran out as the message came, and the wait that
			// followed took it for the client leaving: never end with OK
			// a stream whose message may be unanswered (see endErr). Only
			// an end is checked: a stream that goes on fails its next
			// receive on the expired context.
			return status.Error(codes.DeadlineExceeded, errStreamIdle.Error())
		}
		if err != nil || done {
			return err
		}
	}
}

func newStream(s *Server, srv extprocv3.ExternalProcessor_ProcessServer) *stream {
	return &stream{s: s, srv: srv, ctx: srv.Context(), maxBody: s.maxBody}
}

// endErr is what the handler returns once receiving has failed: nothing
// for Envoy's orderly close (io.EOF), else the failure. gRPC must never end
// with OK a stream that still has a message unanswered, such as a body too
// large to receive: Envoy would carry on without vgw, even failing closed
// (ext_proc.cc onGrpcClose), and route by the client's own headers. When
// Envoy has reset the stream, what the handler returns reaches no one.
func endErr(err error) error {
	if err == nil || errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// phase is where a stream stands in Envoy's exchange.
type phase uint8

const (
	phaseRequestHeaders phase = iota // nothing received yet
	phaseRequestBody                 // headers answered; the model is in the body
	phaseResponse                    // admitted: the request went upstream
)

// stream is the state of one ext_proc stream; only its handler goroutine
// touches it.
type stream struct {
	s    *Server
	srv  extprocv3.ExternalProcessor_ProcessServer
	ctx  context.Context
	node string // the Envoy's node id (see MetadataNode)

	phase    phase
	extended bool   // override_message_timeout used in this phase
	maxBody  int    // the request's body limit, by its path
	form     bool   // the body is multipart/form-data
	boundary []byte // its boundary; nil when it gave none
	// body is the body decided on, for the rewrites below; addKV a
	// `"model":NAME` a JSON one gets (the default model's); bodyChanged
	// says body is not what the client sent; renamed that its model must
	// be renamed to the model's own (an alias).
	body, addKV []byte
	bodyChanged bool
	renamed     bool
	table       *modelTable // the one the request was decided in

	// reqBodyMode is the request body mode Envoy reported: it says
	// whether a body message is the whole body (see requestBody).
	reqBodyMode filterv3.ProcessingMode_BodySendMode
	// respBodyMode is the response body mode Envoy reported, which a mode
	// override must restate (ext_proc.cc effectiveModeOverride copies both
	// body modes verbatim).
	respBodyMode filterv3.ProcessingMode_BodySendMode

	model *modelEntry
	key   flowKey // the request's tenant and priority
	size  int     // the request's bytes (its content-length until its body is read), for VTC
	held  bool    // a slot of model.gate is ours
	// rpm is the request budget the request was taken from, until it is
	// admitted (the stream's close gives it back if it never is); tpm
	// the token budget its tokens go to, with meter reading them from
	// the response (metering: its body comes to vgw). upload says the
	// request's body is a file, not a prompt, which an estimate of its
	// tokens must not count.
	rpm, tpm   *budget
	meter      usageMeter
	metering   bool
	upload     bool
	lease      Lease // the model's server is ours: admitted
	admittedAt time.Time
	status     int // upstream :status

	// idle bounds the waits for Envoy's next message that Envoy's own
	// idle timer bounds (see idle.go and bounded); nil when the listener
	// sets no bound.
	idle      *idleWatch
	responded bool // response headers came: no bound from here on
	streamed  bool // admitted at its headers: its body streams upstream after
}

// recv reads Envoy's next message. While a request waits (for a slot, for
// its model) nothing is read: Envoy sends nothing then, and a client that
// leaves is seen through the stream's context, which gRPC cancels when
// Envoy resets the stream. Envoy's close is END_STREAM then RST_STREAM at
// once (grpc_client_impl.h close()); with the ext_proc_graceful_grpc_close
// runtime flag it half-closes and resets when its remote close timeout
// (1 s by default, ext_proc.cc) runs out, so a wait sees the client leave
// at most that late, and vgw keeps no second goroutine per waiting request
// to watch for it sooner. Until the response begins, the wait for Envoy's
// message is bounded (idle.go).
func (st *stream) recv() (*extprocv3.ProcessingRequest, error) {
	if st.idle == nil || !st.bounded() {
		return st.srv.Recv()
	}
	st.idle.arm()
	req, err := st.srv.Recv()
	st.idle.disarm()
	return req, err
}

// bounded reports whether the wait for Envoy's next message is one that
// Envoy's stream_idle_timeout bounds: for the request headers, which
// Envoy sends as it opens the stream, and for the response headers of a
// request admitted on its whole body (the backend's time to its first
// byte, with nothing flowing to or from the client). The wait for the body
// is the client's upload, and so is the wait for the response of a request
// admitted at its headers, whose body then streams upstream: every chunk
// of it restarts Envoy's timer, so however long a live upload takes, it
// is not bounded here.
func (st *stream) bounded() bool {
	switch st.phase {
	case phaseRequestHeaders:
		return true
	case phaseResponse:
		return !st.responded && !st.streamed
	}
	return false
}

// close runs when the stream's handler returns, however it returns.
func (st *stream) close() {
	st.finish()
	st.giveBack(time.Now())
	if st.idle != nil {
		st.idle.disarm()
	}
}

func (st *stream) send(r *extprocv3.ProcessingResponse) error {
	return st.srv.Send(r)
}

// Replies that carry nothing are shared: gRPC only reads a message it sends.
var (
	continueRequestHeaders   = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{}}}
	continueRequestBody      = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{}}}
	continueRequestTrailers  = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{RequestTrailers: &extprocv3.TrailersResponse{}}}
	continueResponseBody     = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{ResponseBody: &extprocv3.BodyResponse{}}}
	continueResponseTrailers = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{ResponseTrailers: &extprocv3.TrailersResponse{}}}
)

// handle answers one message. done means the stream has nothing more to do.
func (st *stream) handle(req *extprocv3.ProcessingRequest) (done bool, err error) {
	if pc := req.GetProtocolConfig(); pc != nil {
		st.reqBodyMode = pc.GetRequestBodyMode()
		st.respBodyMode = pc.GetResponseBodyMode()
	}
	switch r := req.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		if st.phase != phaseRequestHeaders {
			return true, status.Error(codes.FailedPrecondition, "request headers received twice")
		}
		return st.requestHeaders(r.RequestHeaders)
	case *extprocv3.ProcessingRequest_RequestBody:
		if st.phase == phaseResponse {
			// Decided at the headers; Envoy sends the body anyway when it
			// ignored the mode override (allow_mode_override off).
			return false, st.send(continueRequestBody)
		}
		return st.requestBody(r.RequestBody)
	case *extprocv3.ProcessingRequest_RequestTrailers:
		if st.phase == phaseRequestBody {
			// Trailers where the body should be: the request had none
			// (ext_proc.cc onTrailers sends no body message when nothing
			// was buffered), and this is vgw's last look at it.
			return true, st.noBody()
		}
		return false, st.send(continueRequestTrailers)
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		return false, st.responseHeaders(r.ResponseHeaders)
	case *extprocv3.ProcessingRequest_ResponseBody:
		if st.metering {
			st.meter.read(r.ResponseBody.GetBody())
		}
		if r.ResponseBody.GetEndOfStream() {
			st.finish()
		}
		return false, st.send(continueResponseBody)
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		st.finish()
		return false, st.send(continueResponseTrailers)
	default:
		return true, status.Errorf(codes.InvalidArgument, "unsupported ext_proc message %T", r)
	}
}

// headerValue reads a header as Envoy sends it: in raw_value since Envoy
// 1.27 (mutation_utils.cc headersToProto), in value before.
func headerValue(h *corev3.HeaderValue) []byte {
	if len(h.RawValue) > 0 || h.Value == "" {
		return h.RawValue
	}
	return []byte(h.Value)
}

func (st *stream) requestHeaders(h *extprocv3.HttpHeaders) (bool, error) {
	var method, path, model, contentLength, contentType, tenant, objective []byte
	var hasModel, hasCluster bool
	ft := st.s.flows.Load()
	for _, hv := range h.GetHeaders().GetHeaders() {
		switch k := hv.GetKey(); k {
		case ":method":
			method = headerValue(hv)
		case ":path":
			path = headerValue(hv)
		case HeaderModel:
			model, hasModel = headerValue(hv), true
		case "content-length":
			contentLength = headerValue(hv)
		case "content-type":
			contentType = headerValue(hv)
		case HeaderCluster:
			hasCluster = true
		case ft.tenantHeader:
			tenant = headerValue(hv)
		case ft.objectiveHeader:
			objective = headerValue(hv)
		}
	}
	st.key = ft.key(tenant, objective)
	t, id := targetOf(path)
	if done, err := st.local(method, t, id); done {
		return true, err
	}
	if t == targetAudio {
		st.maxBody = st.s.maxAudioBody
	}
	if len(contentLength) > 0 {
		n, err := strconv.ParseInt(string(contentLength), 10, 64)
		if err == nil && n > int64(st.maxBody) {
			return true, st.reject(emptyModel, tooLarge(st.maxBody), 0, time.Time{})
		}
		st.size = int(max(n, 0))
	}
	st.boundary, st.form = FormBoundary(contentType)
	st.upload = st.form || t == targetAudio
	if hasModel && st.s.trustModelHeader.Load() {
		// The header fast path, where the operator trusts whoever sets
		// x-vgw-model: decide now and tell Envoy not to send the body.
		return st.decide(model, true)
	}
	if h.GetEndOfStream() {
		return true, st.noBody()
	}
	st.phase = phaseRequestBody
	st.extended = false
	if hasCluster {
		return false, st.send(dropClientCluster)
	}
	return false, st.send(continueRequestHeaders)
}

// dropClientCluster goes on to the body without the client's own
// x-vgw-cluster: the route was resolved from it, so the cache is cleared
// too (router.cc recomputes it). vgw sets the header itself on every
// request it admits; this keeps one it never sees whole (a request whose
// only message after the headers is trailers Envoy skips, ext_proc.cc
// onTrailers) from being routed where the client chose.
var dropClientCluster = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{
	Response: &extprocv3.CommonResponse{HeaderMutation: &extprocv3.HeaderMutation{RemoveHeaders: []string{HeaderCluster}}, ClearRouteCache: true},
}}}

// noBody answers a request that has no body: 400, as there is no model
// to route it by.
func (st *stream) noBody() error {
	return st.reject(emptyModel, badRequest(`The request has no body, so no "model" to route by: send the request as JSON (or multipart form data) with a "model" field.`, "missing_model"), 0, time.Time{})
}

// emptyModel stands for the model of a request that named none.
var emptyModel = new(string)

func (st *stream) requestBody(b *extprocv3.HttpBody) (bool, error) {
	body := b.GetBody()
	if !st.wholeBody(b) || len(body) > st.maxBody {
		return true, st.reject(emptyModel, tooLarge(st.maxBody), 0, time.Time{})
	}
	if len(body) == 0 {
		// An empty chunk that ends the request (a chunked HTTP/1.1 body
		// of nothing: processor_state.cc handleCompleteBodyAvailable).
		return true, st.noBody()
	}
	if st.form {
		return st.formBody(body)
	}
	name, err := ExtractModel(body)
	// One table for the whole decision: a reload in between could make
	// the default model's name another's alias.
	t := st.s.models.Load()
	if t.fallback != nil {
		// default_model: a body that names no model gets the default's;
		// so does one whose "model" is null or "", as vLLM takes those.
		switch {
		case errors.Is(err, ErrNoModel):
			st.body, st.addKV = body, t.fallbackKV
			return st.decideIn(t, t.fallback, false)
		case errors.Is(err, ErrModelNotString):
			if replaced, ok := setModel(body, t.fallbackKV[len(`"model":`):], true, nil); ok {
				st.body, st.bodyChanged = replaced, true
				return st.decideIn(t, t.fallback, false)
			}
		}
	}
	if err != nil {
		var se *SyntaxError
		switch {
		case errors.As(err, &se), errors.Is(err, ErrNotObject), errors.Is(err, ErrTooDeep):
			return true, st.reject(emptyModel, badRequest("The request body is not valid JSON: "+err.Error(), "invalid_json"), 0, time.Time{})
		default:
			return true, st.reject(emptyModel, badRequest("The request body has no usable \"model\": "+err.Error(), "missing_model"), 0, time.Time{})
		}
	}
	st.body = body
	return st.decideIn(t, name, false)
}

// formBody decides on a multipart/form-data body by its model field.
func (st *stream) formBody(body []byte) (bool, error) {
	start, end, err := formModel(body, st.boundary)
	name := body[start:end]
	t := st.s.models.Load() // one table for the whole decision
	if t.fallback != nil && (errors.Is(err, ErrNoModelField) || err == nil && len(name) == 0) {
		// default_model. A form is sent on as it came: vLLM takes one
		// with no model as its served model's.
		return st.decideIn(t, t.fallback, false)
	}
	switch {
	case errors.Is(err, ErrNoModelField) || err == nil && len(name) == 0:
		return true, st.reject(emptyModel, badRequest(`The form has no "model" field.`, "missing_model"), 0, time.Time{})
	case err != nil:
		return true, st.reject(emptyModel, badRequest("The request body is not valid multipart/form-data: "+err.Error(), "invalid_multipart"), 0, time.Time{})
	}
	st.body = body
	return st.decideIn(t, name, false)
}

// wholeBody reports whether a request_body message holds the whole body.
// In BUFFERED mode it always does, whatever its end_of_stream says: a body
// over Envoy's buffer limit is answered 413 by Envoy and never sent
// (filter_manager.cc), and a request that ends with trailers has its body
// sent with end_of_stream false, the trailers following only in
// request_trailer_mode SEND (ext_proc.cc onTrailers). Only BUFFERED_PARTIAL cuts a body
// at the limit and sends the part without end_of_stream (ext_proc.cc;
// processing_mode.proto), and only in STREAMED mode is a message without
// it a first chunk. vgw's bootstraps use BUFFERED (envoy-check refuses
// the others); an Envoy that reports no mode is taken to use it too.
func (st *stream) wholeBody(b *extprocv3.HttpBody) bool {
	switch st.reqBodyMode {
	case filterv3.ProcessingMode_BUFFERED, filterv3.ProcessingMode_NONE:
		return true
	}
	return b.GetEndOfStream()
}

// decide admits, queues or rejects a request for the named model, and
// sends the answer. atHeaders says the name came from the x-vgw-model
// header, so the answer is a headers reply.
func (st *stream) decide(name []byte, atHeaders bool) (bool, error) {
	return st.decideIn(st.s.models.Load(), name, atHeaders)
}

// decideIn is decide with the model table the name is looked up in.
func (st *stream) decideIn(t *modelTable, name []byte, atHeaders bool) (bool, error) {
	s := st.s
	ref := t.lookup(name)
	m := ref.model
	if m == nil {
		copied := printable(name, 256)
		return true, st.reject(&copied, unknownModel(copied), 0, time.Time{})
	}
	st.model = m
	// An alias goes on as the model's own name (nameRef); at the headers
	// there is no body to say it in, and the request goes as it came.
	st.renamed, st.table = ref.rewrite && !atHeaders && st.body != nil, t
	if s.draining.Load() {
		return true, st.reject(&m.name, draining(m.name), m.gate.depth(), time.Time{})
	}
	start := time.Now()
	if st.body != nil {
		st.size = len(st.body)
	}
	if r := st.takeBudget(start); r != nil {
		m.gate.rejected(st.key)
		return true, st.reject(&m.name, r, m.gate.depth(), time.Time{})
	}
	if m.gate.tryAcquire(start, st.key, st.size) {
		st.held = true
		budget, margin := s.waitBudget(0)
		return st.proceed(ReasonSlotFree, start, start, start.Add(budget), margin, 0, atHeaders)
	}

	limits := m.gate.getLimits()
	budget, margin := s.waitBudget(limits.QueueTimeout)
	deadline := start.Add(budget)
	w := waiterPool.Get().(*waiter)
	res, depth := m.gate.enqueue(w, start, st.key, st.size)
	switch res {
	case admitted:
		waiterPool.Put(w)
		st.held = true
		return st.proceed(ReasonSlotFree, start, start, deadline, margin, 0, atHeaders)
	case full:
		waiterPool.Put(w)
		r := queueFull(m.name, m.gate.retryAfter(start))
		r.rendered = m.queueFullBody
		return true, st.reject(&m.name, r, depth, time.Time{})
	case tenantFull:
		waiterPool.Put(w)
		return true, st.reject(&m.name, tenantQueueFull(m.name, st.tenant(), m.gate.tenantRetryAfter(start, st.key)), depth, time.Time{})
	}

	st.record(&decision{at: start, model: &m.name, outcome: OutcomeQueued, reason: ReasonWaitSlot, depth: depth})
	if err := st.extendTimeout(deadline, margin); err != nil {
		st.leaveQueue(w) // sending failed: the stream is gone
		return true, err
	}
	slotDeadline := start.Add(limits.QueueTimeout)
	if deadline.Before(slotDeadline) {
		slotDeadline = deadline
	}
	switch got := st.waitSlot(w, slotDeadline); got {
	case ReasonSlotGranted:
		st.held = true
	case ReasonClientGone:
		st.abandoned(start)
		return true, nil // Envoy reset the stream: nobody is listening
	case ReasonDisplaced:
		return true, st.reject(&m.name, displacedBy(m.name, m.gate.retryAfter(time.Now())), m.gate.depth(), start)
	default:
		return true, st.reject(&m.name, timedOut(m.name, ReasonQueueTimeout), m.gate.depth(), start)
	}
	return st.proceed(ReasonSlotGranted, start, time.Now(), deadline, margin, m.gate.depth(), atHeaders)
}

// proceed goes on with a request that holds a slot: it is admitted at
// once when its model can take it now, else it waits for the model. start
// is when the request came, now when it got its slot (start when a slot
// was free: a request that did not wait is not counted as waiting).
func (st *stream) proceed(reason Reason, start, now, deadline time.Time, margin time.Duration, depth int, atHeaders bool) (bool, error) {
	if l, ok := st.s.leases.TryLease(st.node, st.model.name); ok {
		return false, st.admit(l, reason, depth, now, now.Sub(start), atHeaders)
	}
	return st.waitForModel(start, deadline, margin, depth, atHeaders)
}

// waitSlot waits for w to be handed a slot or displaced, for the
// deadline, or for the client to leave, and reports which came first. A
// slot handed over as the wait gives up is given straight back.
func (st *stream) waitSlot(w *waiter, deadline time.Time) Reason {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case <-w.ready:
		got := w.state // written before the word was sent
		waiterPool.Put(w)
		if got == displaced {
			return ReasonDisplaced
		}
		return ReasonSlotGranted
	case <-timer.C:
		st.leaveQueue(w)
		return ReasonQueueTimeout
	case <-st.ctx.Done():
		st.leaveQueue(w)
		return ReasonClientGone
	}
}

// leaveQueue takes w out of its model's queue for a request that gives up.
// A slot handed to w as it gave up is given straight back.
func (st *stream) leaveQueue(w *waiter) {
	switch st.model.gate.abandon(w) {
	case granted:
		<-w.ready
		st.model.gate.release(0)
	case displaced:
		<-w.ready
	}
	waiterPool.Put(w)
}

// waitForModel holds an admitted slot while the manager makes the model
// ready, then admits or answers why not.
func (st *stream) waitForModel(start, deadline time.Time, margin time.Duration, depth int, atHeaders bool) (bool, error) {
	s, m := st.s, st.model
	now := time.Now()
	waitFor, readyFor := ReasonWaitLoad, ReasonModelReady
	if s.state != nil {
		if state := s.state(m.name); state == "sleeping" || state == "waking" {
			waitFor, readyFor = ReasonWaitWake, ReasonModelWoken
		}
	}
	st.record(&decision{at: now, model: &m.name, outcome: OutcomeQueued, reason: waitFor, depth: depth, wait: now.Sub(start)})
	if err := st.extendTimeout(deadline, margin); err != nil {
		return true, err
	}
	ctx, cancel := context.WithDeadline(st.ctx, deadline)
	l, err := s.leases.Lease(ctx, st.node, m.name)
	cancel()
	if err == nil {
		now = time.Now()
		return false, st.admit(l, readyFor, m.gate.depth(), now, now.Sub(start), atHeaders)
	}
	st.releaseSlot()
	switch {
	case st.ctx.Err() != nil:
		st.abandoned(start)
		return true, nil // Envoy reset the stream: nobody is listening
	// This request's own deadline, or the load's load_timeout; not a
	// deadline inside the cause (a Docker API call that timed out is the
	// model being unavailable).
	case errors.Is(ctx.Err(), context.DeadlineExceeded) || timedOutErr(err):
		return true, st.reject(&m.name, timedOut(m.name, ReasonLoadTimeout), m.gate.depth(), start)
	case errors.Is(err, ErrModelNotFound):
		return true, st.reject(&m.name, unknownModel(m.name), m.gate.depth(), start)
	case errors.Is(err, ErrNotRoutable):
		return true, st.reject(&m.name, unavailable(m.name, s.redact(publicCause(err)), retryAfterOf(err), ReasonNotRoutable), m.gate.depth(), start)
	default:
		return true, st.reject(&m.name, unavailable(m.name, s.redact(publicCause(err)), retryAfterOf(err), ReasonLoadFailed), m.gate.depth(), start)
	}
}

// timedOutErr reports whether a manager error says the load ran out of
// time (its own load_timeout, which may end just before this request's).
func timedOutErr(err error) bool {
	var t interface{ Timeout() bool }
	return errors.As(err, &t) && t.Timeout()
}

// publicCause is what a client is told of a failed load: the error's
// Public text where it offers one (a manager error that also carries the
// model server's log tail, for operators), else the whole error.
func publicCause(err error) string {
	var p interface{ Public() string }
	if errors.As(err, &p) {
		return p.Public()
	}
	return err.Error()
}

// DefaultRetryAfter is the Retry-After of a 503 whose error gives none.
const DefaultRetryAfter = 30 * time.Second

// retryAfterOf reads a retry hint from a manager error that offers one.
func retryAfterOf(err error) time.Duration {
	var h interface{ RetryAfter() time.Duration }
	d := DefaultRetryAfter
	if errors.As(err, &h) {
		d = h.RetryAfter()
	}
	return max(time.Second, d)
}

// extendTimeout asks Envoy, once per phase, to wait for vgw's answer until
// a margin past deadline (override_message_timeout; ext_proc.cc accepts it
// only within max_message_timeout, and once per message: vgw needs one).
func (st *stream) extendTimeout(deadline time.Time, margin time.Duration) error {
	if st.extended || st.s.maxMessageTimeout <= 0 {
		return nil
	}
	st.extended = true
	d := min(time.Until(deadline)+margin, st.s.maxMessageTimeout)
	d = max(d, time.Millisecond)
	return st.send(&extprocv3.ProcessingResponse{OverrideMessageTimeout: durationpb.New(d)})
}

// admit sends the request on to its model's cluster (see routeResponse),
// holding l until the response ends.
func (st *stream) admit(l Lease, reason Reason, depth int, now time.Time, wait time.Duration, atHeaders bool) error {
	m := st.model
	h := m.route.Load()
	var resp *extprocv3.ProcessingResponse
	if !atHeaders && (st.addKV != nil || st.bodyChanged || st.renamed || !st.form && (m.defaults.Load() != nil || st.tpm != nil)) {
		resp = st.mergedReply(h, depth)
	}
	switch {
	case resp != nil: // the body rewritten
	case atHeaders && depth == 0 && st.respBodyMode == filterv3.ProcessingMode_NONE:
		resp = h.headersReply // the fast path's common case, built once per route
	case atHeaders:
		resp = headersReply(h, depth, st.respBodyMode)
	case depth == 0:
		resp = h.bodyReply // the common case, built once per route
	default:
		resp = bodyReply(h, depth)
	}
	st.body, st.addKV, st.bodyChanged, st.renamed, st.table = nil, nil, false, false, nil // the stream lasts as long as the response: hold no body
	st.phase = phaseResponse
	st.streamed = atHeaders
	st.lease, st.admittedAt = l, now
	st.rpm = nil // spent: the request goes to its model
	st.record(&decision{at: now, model: &m.name, outcome: OutcomeAdmitted, reason: reason, depth: depth, wait: wait})
	return st.send(resp)
}

// mergedReply admits a request at the body phase with its body rewritten:
// an alias renamed to the model's own name, its model's request defaults
// (and the default model's name) merged under it. The body is replaced,
// and content-length with it, since Envoy refuses a mutated body whose
// length the request's content-length does not match
// (processor_state.cc validateContentLength, after the header mutation
// of the same reply). It is nil when the body goes on as it came: there
// was nothing to rewrite, or what there was could not be read.
func (st *stream) mergedReply(h *routeHeaders, depth int) *extprocv3.ProcessingResponse {
	merged, changed := st.body, st.bodyChanged
	if st.renamed {
		// Every name of this model the body gives, which the server may
		// read instead of the first (vLLM takes the last of repeated
		// keys, and of repeated form fields); a name of another model
		// stays, for the server's own 404.
		same := func(name []byte) bool { return st.table.lookup(name).model == st.model }
		if st.form {
			var spans [][2]int
			_ = modelFields(merged, st.boundary, func(start, end int) bool {
				if same(merged[start:end]) {
					spans = append(spans, [2]int{start, end})
				}
				return true
			})
			if len(spans) > 0 {
				merged, changed = spliceAll(merged, spans, []byte(st.model.name)), true
			}
		} else if renamed, ok := setModel(merged, st.model.quoted, false, same); ok {
			merged, changed = renamed, true
		}
	}
	if !st.form {
		var also [][]byte
		if st.addKV != nil {
			also = [][]byte{st.addKV}
		}
		if st.tpm != nil && streamsWithoutOptions(merged, st.model.defaults.Load()) {
			also = append(also, includeUsage)
		}
		var added bool
		merged, added, _ = st.model.defaults.Load().mergeUnder(merged, also...)
		changed = changed || added
	}
	if !changed {
		return nil
	}
	r := routeResponse(h, depth)
	r.HeaderMutation.SetHeaders = append(r.HeaderMutation.SetHeaders, setHeader("content-length", strconv.AppendInt(nil, int64(len(merged)), 10)))
	r.BodyMutation = &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: merged}}
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{Response: r}}}
}

// includeUsage is what a streamed request of a tenant with a token budget
// gets, so that its server reports the usage at the stream's end (one more
// event, with no choices, before [DONE], as OpenAI's API sends it).
var includeUsage = []byte(`"stream_options":{"include_usage":true}`)

// streamsWithoutOptions reports whether a JSON body, with request
// defaults d merged under it, asks for a stream ("stream": true, the
// last of repeated keys, as vLLM reads them) and sets no stream_options,
// which vgw leaves as the client or the defaults set them.
func streamsWithoutOptions(body []byte, d *defaults) bool {
	var stream []byte
	hasStream, options := false, false
	_, _, err := topLevelKeys(body, func(k []byte, start, end int) bool {
		switch string(k) {
		case "stream":
			stream, hasStream = body[start:end], true
		case "stream_options":
			options = true
		}
		return true
	})
	if err != nil {
		return false
	}
	if !hasStream {
		stream, _ = d.value("stream")
	}
	if !options {
		_, options = d.value("stream_options")
	}
	return string(stream) == "true" && !options
}

// routeResponse sets the route headers and the queue depth, and clears the
// route cache so that Envoy's router picks the cluster from x-vgw-cluster
// (ENVOY-FACTS §5; router.cc recomputes the route).
func routeResponse(h *routeHeaders, depth int) *extprocv3.CommonResponse {
	return &extprocv3.CommonResponse{
		HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{
			h.model, h.clusterHdr, depthHeader(depth),
		}},
		ClearRouteCache: true,
	}
}

// headersReply admits a request at the headers phase and tells Envoy not
// to send the body. A mode override replaces both body modes
// (ext_proc.cc effectiveModeOverride), so the response one is restated.
func headersReply(h *routeHeaders, depth int, respBodyMode filterv3.ProcessingMode_BodySendMode) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{
		Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{Response: routeResponse(h, depth)}},
		ModeOverride: &filterv3.ProcessingMode{
			RequestBodyMode:  filterv3.ProcessingMode_NONE,
			ResponseBodyMode: respBodyMode,
		},
	}
}

// bodyReply admits a request at the body phase.
func bodyReply(h *routeHeaders, depth int) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
		RequestBody: &extprocv3.BodyResponse{Response: routeResponse(h, depth)},
	}}
}

// depthHeaders are the x-vgw-queue-depth entries for small depths, shared
// so the common case allocates nothing.
var depthHeaders = func() (hs [64]*corev3.HeaderValueOption) {
	for i := range hs {
		hs[i] = setHeader(HeaderQueueDepth, strconv.AppendInt(nil, int64(i), 10))
	}
	return hs
}()

func depthHeader(depth int) *corev3.HeaderValueOption {
	if depth >= 0 && depth < len(depthHeaders) {
		return depthHeaders[depth]
	}
	return setHeader(HeaderQueueDepth, strconv.AppendInt(nil, int64(depth), 10))
}

func (st *stream) responseHeaders(h *extprocv3.HttpHeaders) error {
	st.responded = true
	for _, hv := range h.GetHeaders().GetHeaders() {
		if hv.GetKey() == ":status" {
			st.status, _ = strconv.Atoi(string(headerValue(hv)))
			break
		}
	}
	if h.GetEndOfStream() {
		st.finish()
	}
	depth := 0
	if st.model != nil {
		depth = st.model.gate.depth()
	}
	if st.tpm != nil && st.lease != nil && st.status >= 200 && st.status < 300 {
		// The tenant's tokens are counted from the usage at the end of
		// a response that succeeded: its body comes to vgw, chunk by
		// chunk (a mode override from the response headers). The
		// override sets both body modes (ext_proc.cc
		// effectiveModeOverride copies both), so the request's is
		// restated as it stands: NONE where vgw turned it off at the
		// headers, else the filter's, whose body is whole by now.
		st.metering = true
		reqMode := st.reqBodyMode
		if st.streamed {
			reqMode = filterv3.ProcessingMode_NONE
		}
		r := responseHeaderReply(depth)
		r.ModeOverride = &filterv3.ProcessingMode{RequestBodyMode: reqMode, ResponseBodyMode: filterv3.ProcessingMode_STREAMED}
		return st.send(r)
	}
	if depth < len(responseHeaderReplies) {
		return st.send(responseHeaderReplies[depth])
	}
	return st.send(responseHeaderReply(depth))
}

// responseHeaderReply tells the client the model's queue depth.
func responseHeaderReply(depth int) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
		ResponseHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
			HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{depthHeader(depth)}},
		}},
	}}
}

// responseHeaderReplies are the replies for small depths, built once: gRPC
// only reads a message it sends, so they are shared by every stream.
var responseHeaderReplies = func() (rs [64]*extprocv3.ProcessingResponse) {
	for i := range rs {
		rs[i] = responseHeaderReply(i)
	}
	return rs
}()

// reject answers the request with an error and records why. start is when
// the request began to wait, or zero if it never did.
func (st *stream) reject(model *string, r *rejection, depth int, start time.Time) error {
	now := time.Now()
	var wait time.Duration
	if !start.IsZero() {
		wait = now.Sub(start)
	}
	st.record(&decision{at: now, model: model, outcome: r.outcome, reason: r.reason, status: r.status, depth: depth, wait: wait})
	return st.send(r.immediate(depth))
}

// record files a decision about this stream's request: the ring, the log
// (at debug level only: the Enabled check comes first, so that at info
// level nothing is formatted or allocated), the model's counts (or the
// unknown-model counts before a model is known), and, for a request that
// waited, the wait observer.
func (st *stream) record(d *decision) {
	s := st.s
	if k := st.key; k.t != nil {
		d.tenant, d.priority = &k.t.tenants[k.tenant].name, k.t.priorities[k.band]
	}
	s.decisions.record(d)
	if s.log.Enabled(st.ctx, slog.LevelDebug) {
		s.log.LogAttrs(st.ctx, slog.LevelDebug, "decision",
			slog.String("model", *d.model),
			slog.String("outcome", d.outcome.String()),
			slog.String("reason", d.reason.String()),
			slog.Int("status", d.status),
			slog.Int("queue_depth", d.depth),
			slog.String("tenant", st.tenant()),
			slog.Int("priority", d.priority),
			slog.Duration("wait", d.wait))
	}
	if st.model != nil {
		st.model.counts.add(d.outcome, d.status)
	} else {
		s.unknown.add(d.outcome, d.status)
	}
	if d.wait > 0 && d.outcome != OutcomeQueued && s.waited != nil {
		s.waited(*d.model, d.wait)
	}
}

// tenant is the name of the request's tenant, "" before it is known.
func (st *stream) tenant() string {
	if k := st.key; k.t != nil {
		return k.t.tenants[k.tenant].name
	}
	return ""
}

// abandoned records that the client left while its request waited.
func (st *stream) abandoned(start time.Time) {
	now := time.Now()
	st.record(&decision{at: now, model: &st.model.name, outcome: OutcomeAbandoned, reason: ReasonClientGone, depth: st.model.gate.depth(), wait: now.Sub(start)})
}

// releaseSlot gives back a slot the request took but never used.
func (st *stream) releaseSlot() {
	if st.held {
		st.held = false
		st.model.gate.release(0)
	}
}

// finish ends a request that holds a slot: the slot goes back, and the
// lease of an admitted one with how it went. It runs at most once per
// slot; later calls do nothing.
func (st *stream) finish() {
	var took time.Duration
	if st.lease != nil {
		took = time.Since(st.admittedAt)
	}
	if st.held {
		st.held = false
		served := took
		if st.status == 0 {
			served = 0 // no answer began: not a time the model took to serve
		}
		st.model.gate.release(served)
	}
	if st.lease != nil {
		l := st.lease
		st.lease = nil
		if st.tpm != nil && st.status >= 200 && st.status < 300 {
			prompt := st.size
			if st.upload {
				prompt = 0 // a file, not words
			}
			st.tpm.spend(time.Now(), st.meter.tokens(prompt))
		}
		l.Release(Result{Status: st.status, Duration: took})
	}
}

// takeBudget takes the request from its tenant's budgets, or answers why
// it cannot: the tenant has spent its tokens for the minute (they are
// counted once each response has ended), or its requests.
func (st *stream) takeBudget(now time.Time) *rejection {
	k := st.key
	if k.t == nil {
		return nil
	}
	t := &k.t.tenants[k.tenant]
	if t.tpm != nil {
		if wait := t.tpm.empty(now); wait > 0 {
			return overBudget(t.name, "tokens", t.tpm.rate, wait)
		}
		st.tpm, st.meter = t.tpm, newUsageMeter()
	}
	if t.rpm != nil {
		if wait := t.rpm.take(now); wait > 0 {
			st.tpm = nil
			return overBudget(t.name, "requests", t.rpm.rate, wait)
		}
		st.rpm = t.rpm
	}
	return nil
}

// giveBack returns to its tenant's request budget a request that was
// taken from it and then never went to its model (the queue turned it
// away or displaced it, it timed out, its model failed, its client or
// the stream went): it is not a request the tenant was served. The
// stream's close calls it, once the request can no longer be admitted.
func (st *stream) giveBack(now time.Time) {
	if st.rpm != nil {
		st.rpm.spend(now, -1)
		st.rpm = nil
	}
}
