package extproc_test

import (
	"bytes"
	"context"
	"encoding/json"
	"mime/multipart"
	"testing"

	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/extproc/extproctest"
)

// TestRenameRepeatedNames: vLLM (Python's json, Starlette's forms) reads
// the last "model" of a body, vgw routes by the first. A body whose first
// name is an alias, and that names the model again later, reaches the
// server naming the model itself every time (an attacker found only the
// first renamed, and the server answering 404). A body whose first name
// is the key is not read past it (README: duplicate keys).
func TestRenameRepeatedNames(t *testing.T) {
	h := start(t, namedModels)
	for _, body := range []string{
		`{"model":"gpt-4o-mini","messages":[],"model":"gpt-4o-mini"}`,
		`{"model":"gpt-4o-mini","messages":[],"mod\u0065l":"gpt-4o-mini"}`,
		`{"model":"gpt-4o-mini","messages":[],"model":"llama-8b","model":"meta-llama/Llama-3.1-8B-Instruct"}`,
	} {
		res := do(t, h, context.Background(), req("dup", []byte(body)))
		if res.Status != 200 || res.Forwarded == nil || res.Forwarded.Cluster != clusterOf("llama-8b") {
			t.Fatalf("%s: status %d", body, res.Status)
		}
		<-h.leases.obsCh
		var last struct{ Model string } // encoding/json, like Python's json: the last key wins
		if err := json.Unmarshal(res.Forwarded.Body, &last); err != nil {
			t.Fatal(err)
		}
		if last.Model != "llama-8b" {
			t.Errorf("%s\n  sent on as %s\n  the server reads model %q, which it does not serve", body, res.Forwarded.Body, last.Model)
		}
	}

	// The same with a form: Starlette's FormData.get returns the last field.
	h2 := start(t, namedModels)
	body, ct := form(t, "", [2]string{"model", "gpt-4o-mini"}, [2]string{"file", "aaaa"}, [2]string{"model", "gpt-4o-mini"})
	res := do(t, h2, context.Background(), extproctest.Request{Path: "/v1/audio/transcriptions", Headers: []extproctest.Header{{Key: "content-type", Value: ct}}, Body: body})
	if res.Status != 200 || res.Forwarded == nil {
		t.Fatalf("form: status %d", res.Status)
	}
	b, _ := extproc.FormBoundary([]byte(ct))
	f, err := multipart.NewReader(bytes.NewReader(res.Forwarded.Body), string(b)).ReadForm(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	if vs := f.Value["model"]; vs[len(vs)-1] != "llama-8b" {
		t.Errorf("form sent on with model fields %q: the server reads the last", vs)
	}
}
