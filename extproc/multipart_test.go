package extproc_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"strings"
	"testing"
	"time"

	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/extproc/extproctest"
)

// form builds a multipart body as Go's mime/multipart writes one (as
// the OpenAI Go SDK does): fields in the order given, the file as a file
// part. It returns the body and its content type.
func form(t testing.TB, boundary string, parts ...[2]string) ([]byte, string) {
	t.Helper()
	var b bytes.Buffer
	w := multipart.NewWriter(&b)
	if boundary != "" {
		if err := w.SetBoundary(boundary); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range parts {
		var err error
		if p[0] == "file" {
			var fw io.Writer
			fw, err = w.CreateFormFile("file", "speech.mp3")
			if err == nil {
				_, err = fw.Write([]byte(p[1]))
			}
		} else {
			err = w.WriteField(p[0], p[1])
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes(), w.FormDataContentType()
}

func TestFormBoundary(t *testing.T) {
	tests := []struct {
		ct       string
		boundary string
		form     bool
	}{
		{"multipart/form-data; boundary=abc", "abc", true},
		{`Multipart/Form-Data; charset=utf-8; BOUNDARY="a;b c"`, "a;b c", true},
		{"multipart/form-data", "", true},
		{"multipart/form-data; boundary=" + strings.Repeat("x", 71), "", true},
		{"application/json", "", false},
		{"multipart/mixed; boundary=abc", "", false},
		{"", "", false},
	}
	for _, tt := range tests {
		b, ok := extproc.FormBoundary([]byte(tt.ct))
		if string(b) != tt.boundary || ok != tt.form {
			t.Errorf("%q: boundary %q form %v, want %q %v", tt.ct, b, ok, tt.boundary, tt.form)
		}
	}
}

func TestExtractFormModel(t *testing.T) {
	audio := "ID3\x04\x00" + strings.Repeat("\r\n--not-the-boundary\r\n", 3) + "\x00\xff"
	before, _ := form(t, "b0und", [2]string{"model", "whisper-1"}, [2]string{"file", audio})
	after, _ := form(t, "b0und", [2]string{"file", audio}, [2]string{"language", "en"}, [2]string{"model", "org/whisper"})
	none, _ := form(t, "b0und", [2]string{"file", audio}, [2]string{"language", "en"})
	// The boundary's text inside the file, not at a line's start, is
	// content.
	inside, _ := form(t, "b0und", [2]string{"file", "x--b0und\r\nx"}, [2]string{"model", "m"})
	tests := []struct {
		name  string
		body  string
		model string
		err   error
	}{
		{name: "model before the file", body: string(before), model: "whisper-1"},
		{name: "model after the file", body: string(after), model: "org/whisper"},
		{name: "no model", body: string(none), err: extproc.ErrNoModelField},
		{name: "the boundary inside the file", body: string(inside), model: "m"},
		{name: "unquoted name, LF lines, a preamble", body: "preamble\n--b0und\nContent-Disposition: form-data; name=model\n\nm2\n--b0und--\n", model: "m2"},
		{name: "header names in any case, padding after the delimiter", body: "--b0und  \r\ncontent-DISPOSITION:form-data;NAME=\"model\"\r\n\r\nm3\r\n--b0und--", model: "m3"},
		{name: "a file called model is not the field", body: "--b0und\r\nContent-Disposition: form-data; name=\"model\"; filename=\"model\"\r\n\r\nx\r\n--b0und\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm4\r\n--b0und--\r\n", model: "m4"},
		{name: "another field whose name ends in model", body: "--b0und\r\nContent-Disposition: form-data; name=\"xmodel\"\r\n\r\nx\r\n--b0und--\r\n", err: extproc.ErrNoModelField},
		{name: "an empty model", body: "--b0und\r\nContent-Disposition: form-data; name=model\r\n\r\n\r\n--b0und--\r\n", model: ""},
		{name: "no delimiter", body: "just bytes", err: extproc.ErrMalformedForm},
		{name: "unterminated headers", body: "--b0und\r\nContent-Disposition: form-data; name=model", err: extproc.ErrMalformedForm},
		{name: "unterminated part", body: "--b0und\r\nContent-Disposition: form-data; name=model\r\n\r\nm", err: extproc.ErrMalformedForm},
		{name: "a line that only starts as a delimiter is not one", body: "--b0undjunk\r\n--b0und\r\nContent-Disposition: form-data; name=model\r\n\r\n--b0undx\r\n\r\n--b0und--", model: "--b0undx\r\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := extproc.ExtractFormModel([]byte(tt.body), []byte("b0und"))
			if !errors.Is(err, tt.err) || err == nil && string(got) != tt.model {
				t.Fatalf("got %q, %v; want %q, %v", got, err, tt.model, tt.err)
			}
		})
	}
	if _, err := extproc.ExtractFormModel(before, nil); !errors.Is(err, extproc.ErrNoBoundary) {
		t.Errorf("no boundary: %v", err)
	}
}

// TestExtractFormModelAllocs: finding the model allocates nothing, before
// the file or after it.
func TestExtractFormModelAllocs(t *testing.T) {
	body, ct := form(t, "", [2]string{"file", strings.Repeat("a", 1<<20)}, [2]string{"model", "whisper-1"})
	boundary, _ := extproc.FormBoundary([]byte(ct))
	if n := testing.AllocsPerRun(100, func() {
		if m, err := extproc.ExtractFormModel(body, boundary); err != nil || string(m) != "whisper-1" {
			t.Fatal(m, err)
		}
	}); n != 0 {
		t.Errorf("%v allocations", n)
	}
}

// audioBody is a 24 MiB upload of noise-like bytes, with the model
// before or after it.
func audioBody(tb testing.TB, modelFirst bool) ([]byte, string) {
	tb.Helper()
	file := make([]byte, 24<<20)
	x := uint32(2463534242)
	for i := range file { // xorshift: every byte value, \r and \n and - included
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		file[i] = byte(x)
	}
	if modelFirst {
		return form(tb, "", [2]string{"model", "whisper-1"}, [2]string{"file", string(file)})
	}
	return form(tb, "", [2]string{"file", string(file)}, [2]string{"model", "whisper-1"})
}

// BenchmarkExtractFormModel reads the model of a 24 MiB upload: before
// the file it costs the part headers; after it, one scan of the file.
func BenchmarkExtractFormModel(b *testing.B) {
	for _, bc := range []struct {
		name  string
		first bool
	}{{"model_first", true}, {"model_after_file", false}} {
		body, ct := audioBody(b, bc.first)
		boundary, _ := extproc.FormBoundary([]byte(ct))
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				if m, err := extproc.ExtractFormModel(body, boundary); err != nil || string(m) != "whisper-1" {
					b.Fatal(m, err)
				}
			}
		})
	}
	// The floors, on the same body: one search for a string it does not
	// hold (memory speed), and Go's mime/multipart finding the field.
	body, ct := audioBody(b, false)
	boundary, _ := extproc.FormBoundary([]byte(ct))
	b.Run("floor_bytes_index", func(b *testing.B) {
		absent := append([]byte("\r\n--"), boundary...)
		absent[len(absent)-1]++
		b.SetBytes(int64(len(body)))
		for b.Loop() {
			if bytes.Contains(body, absent) {
				b.Fatal("found")
			}
		}
	})
	b.Run("mime_multipart", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			if m, ok := stdFormModel(body, string(boundary)); !ok || m != "whisper-1" {
				b.Fatal(m, ok)
			}
		}
	})
}

// FuzzExtractFormModel: the reader never fails on any input, and where
// Go's mime/multipart reads a form whole and finds a model field (the
// first field so named, not a file), the reader finds the same value.
func FuzzExtractFormModel(f *testing.F) {
	for _, seed := range [][2]string{
		{"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--b--\r\n", "b"},
		{"--b\nContent-Disposition: form-data; name=model\n\nm\n--b--\n", "b"},
		{"pre\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n\r\n--b\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--b--", "b"},
	} {
		f.Add([]byte(seed[0]), seed[1])
	}
	f.Fuzz(func(t *testing.T, body []byte, boundary string) {
		got, err := extproc.ExtractFormModel(body, []byte(boundary))
		want, ok := stdFormModel(body, boundary)
		if ok && (err != nil || string(got) != want) {
			t.Fatalf("mime/multipart finds model %q; the reader %q, %v", want, got, err)
		}
	})
}

// stdFormModel is the first model field of a form as mime/multipart reads
// it, when it reads the whole form without error.
func stdFormModel(body []byte, boundary string) (string, bool) {
	if boundary == "" || len(boundary) > 70 || mime.FormatMediaType("multipart/form-data", map[string]string{"boundary": boundary}) == "" {
		return "", false
	}
	r := multipart.NewReader(bytes.NewReader(body), boundary)
	model, found := "", false
	for {
		p, err := r.NextRawPart()
		if err == io.EOF {
			return model, found
		}
		if err != nil {
			return "", false
		}
		v, err := io.ReadAll(p)
		if err != nil {
			return "", false
		}
		if !found && p.FormName() == "model" && p.FileName() == "" && len(p.Header.Values("Content-Disposition")) == 1 {
			model, found = string(v), true
		}
	}
}

// TestUploads: a Whisper upload goes to the model its form names, up to
// the audio limit, which is the audio endpoints' alone; a JSON endpoint
// keeps its own.
func TestUploads(t *testing.T) {
	h := start(t, []extproc.Model{{Name: "whisper", Aliases: []string{"whisper-1"}, Limits: limits(4, 4, time.Second)}},
		extproc.Options{MaxBody: 1 << 20, MaxAudioBody: 3 << 20})
	h.env = extproctest.New(h.conn, func() extproctest.Filter { f := repoFilter(t); f.Clock = h.clock; f.BufferLimit = 0; return f }(), h.up.serve)
	var uploadAs func(path, model string, size int, modelFirst bool) extproctest.Request
	upload := func(path string, size int, modelFirst bool) extproctest.Request {
		return uploadAs(path, "whisper", size, modelFirst)
	}
	uploadAs = func(path, model string, size int, modelFirst bool) extproctest.Request {
		fields := [][2]string{{"file", strings.Repeat("a", size)}, {"model", model}}
		if modelFirst {
			fields[0], fields[1] = fields[1], fields[0]
		}
		body, ct := form(t, "", fields...)
		return extproctest.Request{Path: path, Headers: []extproctest.Header{{Key: "content-type", Value: ct}}, Body: body}
	}
	tests := []struct {
		name   string
		req    extproctest.Request
		status int
	}{
		{"model after a 2 MiB file", upload("/v1/audio/transcriptions", 2<<20, false), 200},
		{"model before it", upload("/v1/audio/translations", 2<<20, true), 200},
		{"over the audio limit", upload("/v1/audio/transcriptions", 4<<20, false), 413},
		{"an upload to a JSON endpoint, over its limit", upload("/v1/chat/completions", 2<<20, false), 413},
		{"an upload to a JSON endpoint, under it", upload("/v1/chat/completions", 1<<10, false), 200},
		{"no model field", func() extproctest.Request {
			body, ct := form(t, "", [2]string{"file", "x"})
			return extproctest.Request{Path: "/v1/audio/transcriptions", Headers: []extproctest.Header{{Key: "content-type", Value: ct}}, Body: body}
		}(), 400},
		{"an alias, renamed in the form", uploadAs("/v1/audio/transcriptions", "whisper-1", 1<<10, false), 200},
		{"no boundary", extproctest.Request{Path: "/v1/audio/transcriptions", Headers: []extproctest.Header{{Key: "content-type", Value: "multipart/form-data"}}, Body: []byte("x")}, 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := do(t, h, context.Background(), tt.req)
			if res.Status != tt.status {
				t.Fatalf("status %d (%s) %.200s, want %d", res.Status, res.Details, res.Body, tt.status)
			}
			if tt.status == 200 {
				// The form goes on naming the model itself.
				want := bytes.Replace(tt.req.Body, []byte("\r\n\r\nwhisper-1\r\n"), []byte("\r\n\r\nwhisper\r\n"), 1)
				if res.Forwarded.Cluster != "vgw/whisper" || !bytes.Equal(res.Forwarded.Body, want) {
					t.Errorf("routed to %s, body as it should be: %v", res.Forwarded.Cluster, bytes.Equal(res.Forwarded.Body, want))
				}
				if m, err := extproc.ExtractFormModel(res.Forwarded.Body, func() []byte { b, _ := extproc.FormBoundary([]byte(tt.req.Headers[0].Value)); return b }()); err != nil || string(m) != "whisper" {
					t.Errorf("the form sent names %q (%v)", m, err)
				}
				h.idle(t, "whisper")
			}
		})
	}
}
