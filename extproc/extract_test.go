package extproc

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestExtractModel(t *testing.T) {
	deep := strings.Repeat("[", MaxNesting) + strings.Repeat("]", MaxNesting)
	tooDeep := strings.Repeat("[", MaxNesting+1) + strings.Repeat("]", MaxNesting+1)
	tests := []struct {
		name    string
		body    string
		want    string
		wantErr error // nil: success; errSyntax: any *SyntaxError
	}{
		{name: "first key", body: `{"model":"llama","messages":[]}`, want: "llama"},
		{name: "last key", body: `{"messages":[{"role":"user","content":"hi"}],"stream":true,"model":"llama"}`, want: "llama"},
		{name: "whitespace everywhere", body: " \n\t{ \r\n \"model\" \t:\n \"llama\" \n}\n ", want: "llama"},
		{name: "nested model in messages ignored", body: `{"messages":[{"model":"evil","content":"{\"model\":\"x\"}"}],"model":"good"}`, want: "good"},
		{name: "nested model in tools ignored", body: `{"tools":[{"type":"function","function":{"name":"f","parameters":{"model":{"type":"string"}}}}],"model":"good"}`, want: "good"},
		{name: "model key inside a string ignored", body: `{"prompt":"\"model\":\"evil\"","model":"good"}`, want: "good"},
		{name: "escaped key", body: `{"\u006dodel":"llama"}`, want: "llama"},
		{name: "escaped value", body: `{"model":"org\/m\u00e9"}`, want: "org/mé"},
		{name: "surrogate pair", body: `{"model":"\ud83d\ude00"}`, want: "😀"},
		{name: "lone surrogate", body: `{"model":"a\ud800b"}`, want: "a\uFFFDb"},
		{name: "slash and dots kept verbatim", body: `{"model":"meta-llama/Llama-3.1-8B"}`, want: "meta-llama/Llama-3.1-8B"},
		{name: "numbers and literals skipped", body: `{"temperature":-0.5e+3,"n":0,"stop":null,"echo":false,"stream":true,"model":"m"}`, want: "m"},
		{name: "empty containers skipped", body: `{"a":{},"b":[],"c":[{}],"model":"m"}`, want: "m"},
		{name: "deep nesting allowed", body: `{"a":` + deep + `,"model":"m"}`, want: "m"},
		{name: "first of duplicate keys", body: `{"model":"a","model":"b"}`, want: "a"},
		{name: "rest of body not judged", body: `{"model":"m", garbage`, want: "m"},
		// Strings inside skipped values are checked only for where they end.
		{name: "escaped quotes in skipped string", body: `{"a":"x\"y\\","model":"m"}`, want: "m"},
		{name: "escape not judged in skipped string", body: `{"a":"\q","model":"m"}`, want: "m"},

		{name: "empty body", body: ``, wantErr: ErrNotObject},
		{name: "array", body: `[{"model":"m"}]`, wantErr: ErrNotObject},
		{name: "string", body: `"model"`, wantErr: ErrNotObject},
		{name: "empty object", body: `{}`, wantErr: ErrNoModel},
		{name: "no model", body: `{"messages":[{"model":"nested"}]}`, wantErr: ErrNoModel},
		{name: "model not string", body: `{"model":42}`, wantErr: ErrModelNotString},
		{name: "model null", body: `{"model":null}`, wantErr: ErrModelNotString},
		{name: "model object", body: `{"model":{"name":"m"}}`, wantErr: ErrModelNotString},
		{name: "model empty", body: `{"model":""}`, wantErr: ErrModelNotString},
		{name: "too deep", body: `{"a":` + tooDeep + `,"model":"m"}`, wantErr: ErrTooDeep},

		{name: "truncated", body: `{"messages":[`, wantErr: errSyntax},
		{name: "truncated string", body: `{"messages":"abc`, wantErr: errSyntax},
		{name: "truncated model", body: `{"model":"ll`, wantErr: errSyntax},
		{name: "missing colon", body: `{"model" "m"}`, wantErr: errSyntax},
		{name: "missing comma", body: `{"a":1 "model":"m"}`, wantErr: errSyntax},
		{name: "trailing comma", body: `{"a":1,}`, wantErr: errSyntax},
		{name: "mismatched brackets", body: `{"a":[1,2},"model":"m"}`, wantErr: errSyntax},
		{name: "bad literal", body: `{"a":tru,"model":"m"}`, wantErr: errSyntax},
		{name: "bad number", body: `{"a":01,"model":"m"}`, wantErr: errSyntax},
		{name: "bad escape in key", body: `{"\q":1,"model":"m"}`, wantErr: errSyntax},
		{name: "bad escape in model", body: `{"model":"a\qb"}`, wantErr: errSyntax},
		{name: "bad unicode escape in model", body: `{"model":"\u12G4"}`, wantErr: errSyntax},
		{name: "unquoted key", body: `{model:"m"}`, wantErr: errSyntax},
		{name: "data after object", body: `{"a":1} {"model":"m"}`, wantErr: errSyntax},
		{name: "control char in model", body: "{\"model\":\"a\nb\"}", wantErr: errSyntax},
		{name: "CRLF escaped in model", body: `{"model":"a\r\nb"}`, want: "a\r\nb"},
		{name: "invalid UTF-8 in model", body: "{\"model\":\"a\xffb\"}", wantErr: errSyntax},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ExtractModel([]byte(tt.body))
			switch {
			case tt.wantErr == nil:
				if err != nil {
					t.Fatalf("ExtractModel(%q) error %v, want %q", tt.body, err, tt.want)
				}
				if string(got) != tt.want {
					t.Fatalf("ExtractModel(%q) = %q, want %q", tt.body, got, tt.want)
				}
			case tt.wantErr == errSyntax:
				var se *SyntaxError
				if !errors.As(err, &se) {
					t.Fatalf("ExtractModel(%q) = %q, %v; want a syntax error", tt.body, got, err)
				}
			default:
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("ExtractModel(%q) = %q, %v; want %v", tt.body, got, err, tt.wantErr)
				}
			}
		})
	}
}

// errSyntax stands for "any *SyntaxError" in test tables.
var errSyntax = errors.New("syntax error")

// TestExtractModelAliasesBody checks the zero-copy promise: an unescaped
// model is a window onto the body, not a copy.
func TestExtractModelAliasesBody(t *testing.T) {
	body := []byte(`{"messages":[],"model":"llama"}`)
	got, err := ExtractModel(body)
	if err != nil {
		t.Fatal(err)
	}
	if &got[0] != &body[bytes.Index(body, []byte("llama"))] {
		t.Fatal("model was copied, want a sub-slice of the body")
	}
}

func TestExtractModelAllocs(t *testing.T) {
	for _, tc := range []struct {
		name string
		body []byte
	}{
		{"first", chatBody(1024, true)},
		{"last", chatBody(1024, false)},
		{"dense", denseChatBody(1024, false)},
		{"deep", []byte(`{"a":` + strings.Repeat("[", 60) + strings.Repeat("]", 60) + `,"model":"m"}`)},
	} {
		allocs := testing.AllocsPerRun(100, func() {
			if _, err := ExtractModel(tc.body); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("%s: %v allocs per call, want 0", tc.name, allocs)
		}
	}
}

// chatBody builds an OpenAI chat request of about size bytes whose model
// key comes first or last: a system prompt and turns of plain prose, with
// the odd newline and quoted word, as chat clients send.
func chatBody(size int, modelFirst bool) []byte {
	return buildChat(size, modelFirst, []string{
		`{"role":"user","content":"I run several language models on one GPU server and want to understand how memory is shared between them. Each model reserves a fraction of the card when it starts.\nHow do I tell how much a model really uses, and what happens when a new one does not fit?"}`,
		`{"role":"assistant","content":"Each vLLM server takes the share of GPU memory it is given with \"--gpu-memory-utilization\" and fills most of it with its KV cache. What it really needs is the weights plus enough cache for your longest requests; measure it once and reuse the number."}`,
	})
}

// denseChatBody is a worst case for the scanner: many short strings, each
// with escapes.
func denseChatBody(size int, modelFirst bool) []byte {
	return buildChat(size, modelFirst, []string{`{"role":"user","content":"Tell me about \"GPUs\" and the model of memory they use.\n"}`})
}

func buildChat(size int, modelFirst bool, turns []string) []byte {
	var b bytes.Buffer
	b.WriteString("{")
	if modelFirst {
		b.WriteString(`"model":"llama-3.1-8b",`)
	}
	b.WriteString(`"messages":[{"role":"system","content":"You are a helpful assistant. Answer concisely."}`)
	for i := 0; b.Len() < size-len(turns[i%len(turns)])-64; i++ {
		b.WriteString(",")
		b.WriteString(turns[i%len(turns)])
	}
	b.WriteString(`],"temperature":0.7,"max_tokens":256,"stream":true`)
	if !modelFirst {
		b.WriteString(`,"model":"llama-3.1-8b"`)
	}
	b.WriteString("}")
	return b.Bytes()
}

// referenceModel finds the first top-level "model" with encoding/json, for
// bodies that encoding/json accepts.
func referenceModel(body []byte) (any, bool, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, false, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, false, ErrNotObject
	}
	for dec.More() {
		k, err := dec.Token()
		if err != nil {
			return nil, false, err
		}
		if k == "model" {
			var v any
			err := dec.Decode(&v)
			return v, true, err
		}
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return nil, false, err
		}
	}
	return nil, false, nil
}

// FuzzExtractModel checks ExtractModel against encoding/json on every body
// that encoding/json accepts, and that no input makes it panic.
func FuzzExtractModel(f *testing.F) {
	for _, s := range []string{
		`{"model":"llama","messages":[]}`,
		`{"messages":[{"model":"x"}],"model":"y"}`,
		`{"\u006dodel":"a\u00e9\ud83d\ude00"}`,
		`{"a":[1,-2.5e3,true,false,null,{"b":"c"}],"model":"m"}`,
		`{"model":1}`,
		`{"model":"a","model":"b"}`,
		`[]`,
		`{"a":"\\\"","model":"q"}`,
	} {
		f.Add([]byte(s))
	}
	f.Add(chatBody(512, false))
	f.Fuzz(func(t *testing.T, body []byte) {
		got, err := ExtractModel(body)
		// Whatever the input, a model returned is a non-empty UTF-8 string.
		if err == nil && (len(got) == 0 || !utf8.Valid(got)) {
			t.Fatalf("ExtractModel(%q) = %q: not a usable model name", body, got)
		}
		if !json.Valid(body) || !utf8.Valid(body) {
			return
		}
		want, found, rerr := referenceModel(body)
		if rerr != nil && !errors.Is(rerr, ErrNotObject) {
			t.Fatalf("reference decoder failed on valid JSON %q: %v", body, rerr)
		}
		switch {
		case errors.Is(rerr, ErrNotObject):
			if !errors.Is(err, ErrNotObject) {
				t.Fatalf("ExtractModel(%q) = %q, %v; want ErrNotObject", body, got, err)
			}
		case !found:
			if !errors.Is(err, ErrNoModel) {
				t.Fatalf("ExtractModel(%q) = %q, %v; want ErrNoModel", body, got, err)
			}
		default:
			s, ok := want.(string)
			if !ok || s == "" {
				if !errors.Is(err, ErrModelNotString) {
					t.Fatalf("ExtractModel(%q) = %q, %v; want ErrModelNotString", body, got, err)
				}
				return
			}
			if err != nil || string(got) != s {
				t.Fatalf("ExtractModel(%q) = %q, %v; want %q", body, got, err, s)
			}
		}
	})
}
