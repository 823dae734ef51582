package extproc

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc"
	"google.golang.org/grpc/tap"
)

// An ext_proc stream waits for Envoy in three places before its response
// begins: for the request headers (sent as the stream opens), for the
// body (Envoy buffers the client's upload first), and, once admitted, for
// the response headers (the model's time to its first byte). Two of them
// are bounded on Envoy's side by the connection manager's
// stream_idle_timeout, which ends the HTTP stream and with it the ext_proc
// stream (http_connection_manager.proto; ext_proc.cc onDestroy): the wait
// for the request headers, and for the response headers of a request
// admitted on its whole body, when nothing flows to or from the client.
// A stream silent there for longer than that is no real Envoy's request:
// a peer that opened it and went away without a reset, or one holding
// streams open on purpose, and vgw ends it, giving back whatever it held.
// The other waits are the client's upload, which restarts Envoy's timer
// with every chunk however long it takes, and the response itself
// (response body NONE, trailers SEND: Envoy sends nothing until the
// response ends, however long it streams): no bound applies to them
// (stream.bounded).

// idleWatch is the context gRPC gives an ext_proc stream, with a timer
// that cancels it when the stream has waited for Envoy's next message for
// longer than limit. gRPC's receive watches this context (InTapHandle's
// context becomes the transport stream's), so cancelling it ends a Recv
// that would otherwise wait for ever.
type idleWatch struct {
	context.Context
	cancel context.CancelCauseFunc
	timer  clockwork.Timer
	limit  time.Duration
	// armed says the timer runs; only the stream's handler touches it
	// once the tap has made the watch.
	armed bool
	// ended counts the streams the watch ends (Server.IdleClosed),
	// counted as it ends one: gRPC may end such a stream before its
	// handler ever runs.
	ended *atomic.Uint64
}

type idleWatchKey struct{}

// Value makes the watch findable from the stream's context.
func (w *idleWatch) Value(key any) any {
	if key == (idleWatchKey{}) {
		return w
	}
	return w.Context.Value(key)
}

func (w *idleWatch) expire() {
	if w.Context.Err() != nil {
		return // the stream has ended already
	}
	w.cancel(errStreamIdle)
	w.ended.Add(1)
}

// Err reports an expired watch as a deadline that passed, which it is:
// gRPC answers a receive that failed on its context with the context's
// error (stream.go RecvMsg writes that status itself), so the peer is
// told DeadlineExceeded rather than that it cancelled.
func (w *idleWatch) Err() error {
	if w.expired() {
		return context.DeadlineExceeded
	}
	return w.Context.Err()
}

// expired reports whether the watch ended its stream; false for nil.
func (w *idleWatch) expired() bool {
	return w != nil && context.Cause(w.Context) == errStreamIdle
}

// arm starts the bound on the wait for Envoy's next message, unless it
// runs already: the wait for the first message began when the stream
// opened (watchIdle), not when its handler first looked.
func (w *idleWatch) arm() {
	if w.armed {
		return
	}
	w.armed = true
	w.timer.Reset(w.limit)
}

// disarm stops it: a message came, or vgw itself is the one waiting.
func (w *idleWatch) disarm() {
	w.armed = false
	w.timer.Stop()
}

// errStreamIdle is the cause of a stream ended for its silence.
var errStreamIdle = errors.New("no message from Envoy within the stream idle bound")

// processMethod is the ext_proc method's full name, as gRPC's tap sees it.
var processMethod = "/" + extprocv3.ExternalProcessor_ServiceDesc.ServiceName + "/Process"

// watchIdle is the gRPC tap that gives each ext_proc stream its idle
// watch, armed at once: Envoy opens a stream to send its first message.
func (s *Server) watchIdle(ctx context.Context, info *tap.Info) (context.Context, error) {
	if info.FullMethodName != processMethod {
		return ctx, nil
	}
	cctx, cancel := context.WithCancelCause(ctx)
	w := &idleWatch{Context: cctx, cancel: cancel, limit: s.streamIdle, armed: true, ended: &s.idleClosed}
	w.timer = s.clock.AfterFunc(w.limit, w.expire)
	return w, nil
}

// streamIdleOption is the gRPC server option that bounds how long an
// ext_proc stream may wait for Envoy before its response begins (see
// Options.StreamIdleTimeout), or none when no bound is set.
func (s *Server) streamIdleOption() grpc.ServerOption {
	if s.streamIdle <= 0 {
		return grpc.EmptyServerOption{}
	}
	return grpc.InTapHandle(s.watchIdle)
}

// IdleClosed is how many ext_proc streams vgw has ended for their silence.
func (s *Server) IdleClosed() uint64 { return s.idleClosed.Load() }
