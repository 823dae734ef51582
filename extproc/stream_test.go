package extproc

import (
	"context"
	"errors"
	"io"
	"strconv"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// scriptedStream feeds Process a fixed list of messages, then a final
// receive error, and lets a test intercept each send.
type scriptedStream struct {
	grpc.ServerStream
	ctx    context.Context
	msgs   []*extprocv3.ProcessingRequest
	end    error
	onSend func(*extprocv3.ProcessingResponse) error
	sent   []*extprocv3.ProcessingResponse
}

func (s *scriptedStream) Context() context.Context { return s.ctx }

func (s *scriptedStream) Recv() (*extprocv3.ProcessingRequest, error) {
	if len(s.msgs) == 0 {
		return nil, s.end
	}
	m := s.msgs[0]
	s.msgs = s.msgs[1:]
	return m, nil
}

func (s *scriptedStream) Send(r *extprocv3.ProcessingResponse) error {
	s.sent = append(s.sent, r)
	if s.onSend != nil {
		return s.onSend(r)
	}
	return nil
}

func bodyMsg(body string) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
		RequestBody: &extprocv3.HttpBody{Body: []byte(body), EndOfStream: true}}}
}

// TestProcessNeverEndsOKWithAMessageUnanswered: a receive that fails for
// any reason but Envoy's orderly close must end the stream with an error.
// An OK would make Envoy carry on without vgw (ext_proc.cc onGrpcClose).
func TestProcessNeverEndsOKWithAMessageUnanswered(t *testing.T) {
	s := benchServer(0)
	for _, tc := range []struct {
		name   string
		end    error
		wantOK bool
	}{
		{"orderly close", io.EOF, true},
		{"message too large", status.Error(codes.ResourceExhausted, "grpc: received message larger than max"), false},
		{"reset", status.Error(codes.Canceled, "context canceled"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := s.Process(&scriptedStream{ctx: context.Background(), end: tc.end})
			if (err == nil) != tc.wantOK {
				t.Fatalf("Process returned %v; want OK: %v", err, tc.wantOK)
			}
		})
	}
}

// TestOverrideSendFailsAfterGrant: a queued request whose timeout override
// cannot be sent (Envoy reset the stream) gives back the slot that was
// handed to it in the meantime.
func TestOverrideSendFailsAfterGrant(t *testing.T) {
	s := New([]Model{{Name: "m", Cluster: "c", Limits: Limits{MaxConcurrent: 1, MaxQueue: 1, QueueTimeout: time.Minute}}},
		readyLeases{}, Options{MessageTimeout: 200 * time.Millisecond, MaxMessageTimeout: time.Minute})
	g := s.models.Load().lookup([]byte("m")).model.gate
	if !g.tryAcquire(time.Now(), flowKey{}, 0) {
		t.Fatal("could not take the only slot")
	}
	srv := &scriptedStream{ctx: context.Background(), msgs: []*extprocv3.ProcessingRequest{bodyMsg(`{"model":"m"}`)}, end: io.EOF}
	srv.onSend = func(r *extprocv3.ProcessingResponse) error {
		if r.GetOverrideMessageTimeout() != nil {
			g.release(0) // the slot goes to the queued request now
			return errors.New("stream reset")
		}
		return nil
	}
	if err := s.Process(srv); err == nil {
		t.Fatal("Process returned OK after a failed send")
	}
	if st := g.stats(); st.InFlight != 0 || st.Queued != 0 {
		t.Fatalf("in flight %d, queued %d after the request gave up: a slot leaked", st.InFlight, st.Queued)
	}
}

// TestDraining: while draining, new requests are answered 503 with
// Retry-After and requests already admitted finish.
func TestDraining(t *testing.T) {
	s := New([]Model{{Name: "m", Cluster: "c", Limits: Limits{MaxConcurrent: 4, MaxQueue: 4, QueueTimeout: time.Minute}}}, readyLeases{}, Options{})
	s.SetDraining(true)
	srv := &scriptedStream{ctx: context.Background(), msgs: []*extprocv3.ProcessingRequest{bodyMsg(`{"model":"m"}`)}, end: io.EOF}
	if err := s.Process(srv); err != nil {
		t.Fatal(err)
	}
	ir := srv.sent[len(srv.sent)-1].GetImmediateResponse()
	if ir == nil || ir.GetStatus().GetCode() != 503 || ir.GetDetails() != "vgw_draining" {
		t.Fatalf("answer %v, want a 503 for draining", srv.sent)
	}
	s.SetDraining(false)
	srv = &scriptedStream{ctx: context.Background(), msgs: []*extprocv3.ProcessingRequest{bodyMsg(`{"model":"m"}`)}, end: io.EOF}
	s.Process(srv)
	if srv.sent[0].GetRequestBody() == nil {
		t.Fatalf("after draining ends the request was not admitted: %v", srv.sent)
	}
}

// TestBodyWithoutEndOfStream: whether a request_body message without
// end_of_stream is the whole body depends on the mode Envoy reported. In
// BUFFERED mode it is (a request that ends with trailers, ext_proc.cc
// onTrailers); in BUFFERED_PARTIAL it is the part that fit Envoy's buffer.
func TestBodyWithoutEndOfStream(t *testing.T) {
	for _, tc := range []struct {
		name string
		mode filterv3.ProcessingMode_BodySendMode
		pc   bool // the message carries protocol_config
		want string
	}{
		{"buffered", filterv3.ProcessingMode_BUFFERED, true, "admitted"},
		{"no mode reported", filterv3.ProcessingMode_NONE, false, "admitted"},
		{"buffered partial", filterv3.ProcessingMode_BUFFERED_PARTIAL, true, "413"},
		{"streamed", filterv3.ProcessingMode_STREAMED, true, "413"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := New([]Model{{Name: "m", Cluster: "c", Limits: Limits{MaxConcurrent: 1, MaxQueue: 1, QueueTimeout: time.Minute}}}, readyLeases{}, Options{})
			msg := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
				RequestBody: &extprocv3.HttpBody{Body: []byte(`{"model":"m"}`)}}}
			if tc.pc {
				msg.ProtocolConfig = &extprocv3.ProtocolConfiguration{RequestBodyMode: tc.mode}
			}
			srv := &scriptedStream{ctx: context.Background(), msgs: []*extprocv3.ProcessingRequest{msg}, end: io.EOF}
			if err := s.Process(srv); err != nil {
				t.Fatal(err)
			}
			got := "nothing"
			if len(srv.sent) > 0 {
				switch r := srv.sent[0]; {
				case r.GetRequestBody() != nil:
					got = "admitted"
				case r.GetImmediateResponse() != nil:
					got = strconv.Itoa(int(r.GetImmediateResponse().GetStatus().GetCode()))
				}
			}
			if got != tc.want {
				t.Fatalf("answered %s, want %s", got, tc.want)
			}
		})
	}
}

// TestEmptyBody: a body that is one empty chunk ending the request (a
// chunked HTTP/1.1 body of nothing) is a request without a body.
func TestEmptyBody(t *testing.T) {
	for _, tc := range []struct {
		method, path string
		want         int
	}{
		{"GET", "/v1/models", 200},
		{"POST", "/v1/chat/completions", 400},
	} {
		t.Run(tc.method, func(t *testing.T) {
			s := New([]Model{{Name: "m", Cluster: "c", Limits: Limits{MaxConcurrent: 1, MaxQueue: 1, QueueTimeout: time.Minute}}}, readyLeases{}, Options{})
			headers := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
				Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: ":method", RawValue: []byte(tc.method)}, {Key: ":path", RawValue: []byte(tc.path)}}}}},
				ProtocolConfig: &extprocv3.ProtocolConfiguration{RequestBodyMode: filterv3.ProcessingMode_BUFFERED}}
			body := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{EndOfStream: true}}}
			srv := &scriptedStream{ctx: context.Background(), msgs: []*extprocv3.ProcessingRequest{headers, body}, end: io.EOF}
			if err := s.Process(srv); err != nil {
				t.Fatal(err)
			}
			ir := srv.sent[len(srv.sent)-1].GetImmediateResponse()
			if ir == nil || int(ir.GetStatus().GetCode()) != tc.want {
				t.Fatalf("answered %v, want %d", srv.sent, tc.want)
			}
			// 400 for a missing model, not for broken JSON.
			if tc.want == 400 && !strings.Contains(string(ir.GetBody()), "missing_model") {
				t.Fatalf("body %s, want missing_model", ir.GetBody())
			}
		})
	}
}
