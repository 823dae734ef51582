package extproc

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"testing"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
)

// FuzzSetModel: whenever ExtractModel reads a name, setModel finds the
// same key and ExtractModel of its result reads the new name, and the
// body stays as valid (or not) as it was.
func FuzzSetModel(f *testing.F) {
	for _, s := range []string{
		`{"model":"a"}`, ` { "mod\u0065l" : "g\u0070t" , "x":1}`, `{"messages":[{"model":"x"}],"model":"a","model":"b"}`,
		`{"a":{"model":1},"model" :"q"}trailing`, `{"model":"a"`, "{\"model\"\t:\r\n\"a\\\"b\"}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		name, err := ExtractModel(body)
		if err != nil {
			return
		}
		out, ok := setModel(body, []byte(`"NEW"`), false, func([]byte) bool { return true })
		if !ok {
			t.Fatalf("ExtractModel read %q, setModel found no model in %q", name, body)
		}
		got, err := ExtractModel(out)
		if err != nil || string(got) != "NEW" {
			t.Fatalf("renamed %q -> %q: ExtractModel %q %v", body, out, got, err)
		}
		if json.Valid(body) != json.Valid(out) {
			t.Fatalf("validity changed: %q -> %q", body, out)
		}
	})
}

type captureStream struct {
	grpc.ServerStream
	ctx  context.Context
	sent []*extprocv3.ProcessingResponse
}

func (c *captureStream) Context() context.Context { return c.ctx }
func (c *captureStream) Send(r *extprocv3.ProcessingResponse) error {
	c.sent = append(c.sent, r)
	return nil
}
func (c *captureStream) Recv() (*extprocv3.ProcessingRequest, error) { return nil, io.EOF }

// TestFallbackFormNeverRenamed: a form that names no model goes to the
// default model as it came, even when a reload has since made the
// default's name another model's alias (an attacker found the upload
// replaced whole by the model's name when the fallback was looked up
// again in the newer table). requestBody and formBody now decide in the
// table they read; this runs what a stale lookup would, to show the body
// is never rewritten without a span to rewrite.
func TestFallbackFormNeverRenamed(t *testing.T) {
	lim := Limits{MaxConcurrent: 4, MaxQueue: 4, QueueTimeout: time.Second}
	s := New([]Model{{Name: "whisper-old", Cluster: "c/old", DefaultFor: "whisper-old", Limits: lim}}, readyLeases{}, Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	t1 := s.models.Load()
	body := []byte("--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF....\r\n--b--\r\n")

	cs := &captureStream{ctx: context.Background()}
	st := newStream(s, cs)
	st.form, st.boundary, st.phase = true, []byte("b"), phaseRequestBody
	// formBody, up to its Load: the form names no model, t1 has a default.
	if _, _, err := formModel(body, st.boundary); err != ErrNoModelField || t1.fallback == nil {
		t.Fatalf("setup: %v %q", err, t1.fallback)
	}
	// The reload lands here: whisper-old is now an alias of whisper.
	s.SetModels([]Model{{Name: "whisper", Cluster: "c/new", Aliases: []string{"whisper-old"}, DefaultFor: "whisper", Limits: lim}})
	// formBody goes on: return st.decide(t.fallback, false)
	if _, err := st.decide(t1.fallback, false); err != nil {
		t.Fatal(err)
	}
	st.finish()
	if len(cs.sent) != 1 {
		t.Fatalf("sent %d replies", len(cs.sent))
	}
	r := cs.sent[0].GetRequestBody().GetResponse()
	if bm := r.GetBodyMutation(); bm != nil {
		cl := ""
		for _, h := range r.GetHeaderMutation().GetSetHeaders() {
			if h.GetHeader().GetKey() == "content-length" {
				cl = string(h.GetHeader().GetRawValue())
			}
		}
		if !bytes.Equal(bm.GetBody(), body) {
			t.Errorf("the form (%d bytes) was sent on as %q, content-length %s", len(body), bm.GetBody(), cl)
		}
	}
}
