package extproc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
)

// Request defaults (request_defaults) are top-level keys a model's
// requests get when they lack them, merged under the client's body: the
// client's keys win, as in the Python gateway. Only a model that has
// defaults pays for them: its bodies are read to their end for their
// top-level keys, and one that lacks some is sent on with them added at
// the end of its object (an ext_proc body mutation). A request that
// names no model and goes to the default model gets "model" the same way.

// MaxDefaults is the most keys a model's request defaults may have.
const MaxDefaults = 64

// defaults are request defaults, ready to merge: sorted keys, each with
// its value as compact JSON.
type defaults struct {
	keys   []string
	values [][]byte
	pairs  [][]byte // `"key":value`, rendered once
}

// parseDefaults reads request defaults from a JSON object; nil or empty
// is none.
func parseDefaults(obj []byte) (*defaults, error) {
	if len(bytes.TrimSpace(obj)) == 0 {
		return nil, nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(obj, &m); err != nil {
		return nil, fmt.Errorf("request defaults %.80s: %w", obj, err)
	}
	if len(m) == 0 {
		return nil, nil
	}
	if len(m) > MaxDefaults {
		return nil, fmt.Errorf("request defaults have %d keys, more than %d", len(m), MaxDefaults)
	}
	d := &defaults{}
	for k := range m {
		d.keys = append(d.keys, k)
	}
	slices.Sort(d.keys)
	for _, k := range d.keys {
		var b bytes.Buffer
		if err := json.Compact(&b, m[k]); err != nil {
			return nil, fmt.Errorf("request default %q: %w", k, err)
		}
		d.values = append(d.values, b.Bytes())
		d.pairs = append(d.pairs, append(appendKey(nil, k), b.Bytes()...))
	}
	return d, nil
}

// value returns the default for key, as compact JSON; d may be nil.
func (d *defaults) value(key string) ([]byte, bool) {
	if d == nil {
		return nil, false
	}
	if i, ok := slices.BinarySearch(d.keys, key); ok {
		return d.values[i], true
	}
	return nil, false
}

// errNotMerged says why a body was sent on as it came; errStopped that a
// walk of its keys stopped where its caller had what it wanted.
var (
	errNotMerged = errors.New("the body is not a JSON object to its end")
	errStopped   = errors.New("stopped")
)

// mergeUnder returns body with each key of d that its top-level object
// lacks added at the object's end, then the keys of also (already
// rendered, each `"key":value`, for keys the body is known to lack), and
// whether anything was added. A body that is not one valid JSON object
// is returned as it is, with an error: the backend answers it.
func (d *defaults) mergeUnder(body []byte, also ...[]byte) ([]byte, bool, error) {
	var present uint64 // bit i: the body has d.keys[i]
	closeAt, empty, err := topLevelKeys(body, func(k []byte, _, _ int) bool {
		if d == nil {
			return true
		}
		if i, ok := slices.BinarySearch(d.keys, string(k)); ok {
			present |= 1 << i
		}
		return true
	})
	if err != nil {
		return body, false, err
	}
	n := 0
	if d != nil {
		n = len(d.keys) - bitsSet(present)
	}
	if n == 0 && len(also) == 0 {
		return body, false, nil
	}
	size := len(body)
	for _, kv := range also {
		size += len(kv) + 1
	}
	if d != nil {
		for i := range d.keys {
			if present&(1<<i) == 0 {
				size += len(d.pairs[i]) + 1
			}
		}
	}
	out := make([]byte, 0, size)
	out = append(out, body[:closeAt]...)
	sep := func() {
		if !empty {
			out = append(out, ',')
		}
		empty = false
	}
	for _, kv := range also {
		sep()
		out = append(out, kv...)
	}
	if d != nil {
		for i, kv := range d.pairs {
			if present&(1<<i) == 0 {
				sep()
				out = append(out, kv...)
			}
		}
	}
	return append(out, body[closeAt:]...), true, nil
}

// appendKey appends k as a JSON object key and its colon.
func appendKey(out []byte, k string) []byte {
	q, _ := json.Marshal(k) // a string: cannot fail
	return append(append(out, q...), ':')
}

func bitsSet(x uint64) int {
	n := 0
	for ; x != 0; x &= x - 1 {
		n++
	}
	return n
}

// topLevelKeys calls visit with each top-level key of the JSON object in
// body (escapes decoded) and where its value is, until visit returns
// false, and returns where the object's closing brace is and whether the
// object is empty. Read to its end, the body must be one valid object
// (values are checked as ExtractModel checks what it skips); stopped
// early, or where it is not, the error says so, and visit has seen the
// keys before that point.
func topLevelKeys(body []byte, visit func(key []byte, start, end int) bool) (closeAt int, empty bool, err error) {
	s := scanner{b: body}
	s.skipSpace()
	if s.i >= len(s.b) || s.b[s.i] != '{' {
		return 0, false, errNotMerged
	}
	s.i++
	s.skipSpace()
	if s.i < len(s.b) && s.b[s.i] == '}' {
		closeAt = s.i
		s.i++
		if s.end() != nil {
			return 0, false, errNotMerged
		}
		return closeAt, true, nil
	}
	var buf [64]byte
	for {
		k, err := s.keyInto(buf[:0])
		if err != nil {
			return 0, false, errNotMerged
		}
		s.skipSpace()
		start := s.i
		if s.skipValue() != nil {
			return 0, false, errNotMerged
		}
		if !visit(k, start, s.i) {
			return 0, false, errStopped
		}
		s.skipSpace()
		if s.i >= len(s.b) {
			return 0, false, errNotMerged
		}
		switch s.b[s.i] {
		case ',':
			s.i++
			s.skipSpace()
		case '}':
			closeAt = s.i
			s.i++
			if s.end() != nil {
				return 0, false, errNotMerged
			}
			return closeAt, false, nil
		default:
			return 0, false, errNotMerged
		}
	}
}

// setModel returns body with the value of its first top-level "model"
// replaced by value (a JSON string), and whether it was; with onlyEmpty,
// only a "model" that is null or "" (which vLLM takes as no model) is.
// With same set, every later top-level "model" whose string value same
// says names the same model is replaced too: vLLM reads the last of
// repeated keys, vgw routes by the first.
func setModel(body, value []byte, onlyEmpty bool, same func(name []byte) bool) ([]byte, bool) {
	var spans [][2]int
	// The walk's error is no matter: what it saw before the body stopped
	// being JSON is what ExtractModel routed by (it reads no further).
	topLevelKeys(body, func(k []byte, start, end int) bool {
		if string(k) != "model" {
			return true
		}
		v := body[start:end]
		switch {
		case len(spans) == 0 && onlyEmpty && string(v) != "null" && string(v) != `""`:
			return false
		case len(spans) == 0:
			spans = append(spans, [2]int{start, end})
		case same != nil && len(v) >= 2 && v[0] == '"':
			if name, err := (&scanner{b: v}).stringValue(); err == nil && same(name) {
				spans = append(spans, [2]int{start, end})
			}
		}
		return same != nil
	})
	if len(spans) == 0 {
		return body, false
	}
	return spliceAll(body, spans, value), true
}

// spliceAll returns a copy of body with each of spans (in order, not
// overlapping) replaced by value.
func spliceAll(body []byte, spans [][2]int, value []byte) []byte {
	n := len(body)
	for _, sp := range spans {
		n += len(value) - (sp[1] - sp[0])
	}
	out := make([]byte, 0, n)
	at := 0
	for _, sp := range spans {
		out = append(append(out, body[at:sp[0]]...), value...)
		at = sp[1]
	}
	return append(out, body[at:]...)
}
