package extproc

import (
	"encoding/json"
	"maps"
	"testing"
)

func TestMergeUnder(t *testing.T) {
	d, err := parseDefaults([]byte(`{"temperature": 0.2, "max_tokens": 64, "stop": ["\n\n"]}`))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, body, want string
		changed          bool
	}{
		{"lacks all", `{"model":"m"}`, `{"model":"m","max_tokens":64,"stop":["\n\n"],"temperature":0.2}`, true},
		{"the client's keys win", `{"model":"m","temperature":1,"stop":null}`, `{"model":"m","temperature":1,"stop":null,"max_tokens":64}`, true},
		{"has all", `{"max_tokens":1,"stop":[],"temperature":0,"model":"m"}`, `{"max_tokens":1,"stop":[],"temperature":0,"model":"m"}`, false},
		{"an escaped key counts", `{"model":"m","temp\u0065rature":1,"max_tokens":1,"stop":1}`, `{"model":"m","temp\u0065rature":1,"max_tokens":1,"stop":1}`, false},
		{"nested keys do not count", `{"model":"m","x":{"temperature":1,"max_tokens":1,"stop":1}}`, `{"model":"m","x":{"temperature":1,"max_tokens":1,"stop":1},"max_tokens":64,"stop":["\n\n"],"temperature":0.2}`, true},
		{"whitespace kept", " {\n \"model\" : \"m\" ,\"stop\":1,\"max_tokens\":2,\"temperature\":3\n} \n", " {\n \"model\" : \"m\" ,\"stop\":1,\"max_tokens\":2,\"temperature\":3\n} \n", false},
		{"broken after the model: as it came", `{"model":"m","x":[}`, `{"model":"m","x":[}`, false},
		{"data after the object: as it came", `{"model":"m"}{}`, `{"model":"m"}{}`, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, changed, _ := d.mergeUnder([]byte(tt.body))
			if string(got) != tt.want || changed != tt.changed {
				t.Fatalf("got %s (changed %v), want %s (%v)", got, changed, tt.want, tt.changed)
			}
		})
	}
	// The default model's name, with no defaults of the model's own.
	var none *defaults
	got, changed, err := none.mergeUnder([]byte(`{}`), []byte(`"model":"m"`))
	if string(got) != `{"model":"m"}` || !changed || err != nil {
		t.Fatalf("empty body: %s %v %v", got, changed, err)
	}
}

func TestParseDefaults(t *testing.T) {
	for _, bad := range []string{`[1]`, `{"a":}`, `"x"`} {
		if _, err := parseDefaults([]byte(bad)); err == nil {
			t.Errorf("%s: no error", bad)
		}
	}
	many := map[string]int{}
	for i := range MaxDefaults + 1 {
		many[string(rune('a'+i%26))+string(rune('a'+i/26))] = i
	}
	b, _ := json.Marshal(many)
	if _, err := parseDefaults(b); err == nil {
		t.Errorf("%d keys: no error", len(many))
	}
	if d, err := parseDefaults(nil); d != nil || err != nil {
		t.Errorf("none: %v %v", d, err)
	}
}

// FuzzMergeUnder: a merged body is valid JSON whose top-level object
// holds the client's keys and values as they were and every default the
// client lacked; a body left as it came was not a valid object, or
// lacked nothing.
func FuzzMergeUnder(f *testing.F) {
	for _, s := range []string{`{"model":"m"}`, `{}`, `{"temperature":1}`, ` {"a":[1,{"b":2}],"stop":"x"} `, `{"a":"\"}"}`} {
		f.Add([]byte(s))
	}
	d, err := parseDefaults([]byte(`{"temperature":0.2,"stop":["x"]}`))
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		got, changed, err := d.mergeUnder(body)
		var orig map[string]json.RawMessage
		validObject := json.Unmarshal(body, &orig) == nil && orig != nil
		if !changed {
			if string(got) != string(body) {
				t.Fatal("unchanged, yet not the body")
			}
			if err == nil && validObject && (orig["temperature"] == nil || orig["stop"] == nil) {
				t.Fatalf("%s lacks a default, yet nothing was merged", body)
			}
			return
		}
		if !validObject {
			// The scanner leaves what it skips (control characters in
			// strings, say) to the backend: so does the merge.
			return
		}
		var merged map[string]json.RawMessage
		if err := json.Unmarshal(got, &merged); err != nil {
			t.Fatalf("merged %s: %v", got, err)
		}
		for k, v := range orig {
			if string(merged[k]) != string(v) && !(k == "temperature" || k == "stop") {
				t.Fatalf("key %q: %s became %s", k, v, merged[k])
			}
		}
		want := maps.Clone(orig)
		for i, k := range d.keys {
			if _, ok := want[k]; !ok {
				want[k] = d.values[i]
			}
		}
		for k := range want {
			if _, ok := merged[k]; !ok {
				t.Fatalf("merged %s lacks %q", got, k)
			}
		}
	})
}
