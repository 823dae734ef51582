// This file reads the "model" of an OpenAI request body (ExtractModel):
// a JSON scanner that stops at the key and, for a name without escapes,
// allocates nothing.

package extproc

import (
	"bytes"
	"errors"
	"strconv"
	"unicode/utf16"
	"unicode/utf8"
)

// MaxNesting is the deepest nesting of arrays and objects that ExtractModel
// accepts before the model key is found. It matches encoding/json's limit; a
// deeper body is answered 400 rather than walked.
const MaxNesting = 10000

// Errors from ExtractModel. Each maps to a 400 answer; *SyntaxError says
// where the body stopped being JSON.
var (
	ErrNotObject      = errors.New("request body is not a JSON object")
	ErrNoModel        = errors.New(`request body has no top-level "model" key`)
	ErrModelNotString = errors.New(`"model" must be a non-empty string`)
	ErrTooDeep        = errors.New("request body nests deeper than 10000 levels")
)

// A SyntaxError reports malformed JSON at a byte offset of the body.
type SyntaxError struct {
	Offset int
	msg    string
}

func (e *SyntaxError) Error() string {
	return "invalid JSON at byte " + strconv.Itoa(e.Offset) + ": " + e.msg
}

// ExtractModel returns the value of the top-level "model" key of the JSON
// object in body, reading only as far as that key.
//
// It never unmarshals the body. When the model string holds no escapes the
// result aliases body and nothing is allocated. Keys named "model" inside
// nested values (messages, tools) are skipped, whatever the key order.
//
// Up to the model key the body is checked as JSON: its structure
// (brackets, commas, colons, numbers, literals) in full, object keys and
// the model string in full, and the strings inside skipped values only for
// where they end; what follows the key is not read. The backend parses the
// whole body anyway and answers what vgw did not look at. When a body
// repeats the top-level key, the first one decides the route: the backend
// serves that one model, so a later, different key is answered by the
// backend as an unknown model and cannot reach another model's server.
func ExtractModel(body []byte) ([]byte, error) {
	s := scanner{b: body}
	s.skipSpace()
	if s.i >= len(s.b) || s.b[s.i] != '{' {
		return nil, ErrNotObject
	}
	s.i++
	s.skipSpace()
	if s.i < len(s.b) && s.b[s.i] == '}' {
		s.i++
		if err := s.end(); err != nil {
			return nil, err
		}
		return nil, ErrNoModel
	}
	for {
		isModel, err := s.key()
		if err != nil {
			return nil, err
		}
		if isModel {
			s.skipSpace()
			if s.i >= len(s.b) || s.b[s.i] != '"' {
				if s.i >= len(s.b) {
					return nil, s.fail("unexpected end of body")
				}
				return nil, ErrModelNotString
			}
			v, err := s.stringValue()
			if err != nil {
				return nil, err
			}
			if len(v) == 0 {
				return nil, ErrModelNotString
			}
			return v, nil
		}
		if err := s.skipValue(); err != nil {
			return nil, err
		}
		s.skipSpace()
		if s.i >= len(s.b) {
			return nil, s.fail("unexpected end of body")
		}
		switch s.b[s.i] {
		case ',':
			s.i++
			s.skipSpace()
		case '}':
			s.i++
			if err := s.end(); err != nil {
				return nil, err
			}
			return nil, ErrNoModel
		default:
			return nil, s.fail("expected ',' or '}' after object value")
		}
	}
}

// scanner walks a JSON text without building anything from it.
type scanner struct {
	b []byte
	i int
}

func (s *scanner) fail(msg string) error {
	return &SyntaxError{Offset: s.i, msg: msg}
}

func (s *scanner) skipSpace() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// end checks that only whitespace follows the top-level object.
func (s *scanner) end() error {
	s.skipSpace()
	if s.i != len(s.b) {
		return s.fail("data after the top-level object")
	}
	return nil
}

// key reads an object key and the colon after it, positioned at the key's
// opening quote (after whitespace). It reports whether the key is "model",
// escapes decoded.
func (s *scanner) key() (bool, error) {
	var buf [16]byte
	k, err := s.keyInto(buf[:0])
	return string(k) == "model", err
}

// keyInto reads an object key and the colon after it, as key does, and
// returns the key, escapes decoded: the body's bytes when it has none,
// else decoded into dst (rare: on the caller's stack when short).
func (s *scanner) keyInto(dst []byte) ([]byte, error) {
	if s.i >= len(s.b) {
		return nil, s.fail("unexpected end of body")
	}
	if s.b[s.i] != '"' {
		return nil, s.fail("expected a string key")
	}
	start := s.i + 1
	if err := s.skipString(); err != nil {
		return nil, err
	}
	k := s.b[start : s.i-1]
	if bytes.IndexByte(k, '\\') >= 0 {
		var ok bool
		if k, ok = unescape(dst, k); !ok {
			return nil, &SyntaxError{Offset: start, msg: "invalid escape in key"}
		}
	}
	s.skipSpace()
	if s.i >= len(s.b) || s.b[s.i] != ':' {
		return nil, s.fail("expected ':' after object key")
	}
	s.i++
	return k, nil
}

// skipString moves past the string whose opening quote is at s.i. It finds
// the closing quote (one not escaped by an odd run of backslashes) and looks
// at nothing else: a string vgw skips is checked only for where it ends.
// Its escapes and control characters are the backend's to judge; not
// looking at them is what keeps stepping over a long conversation cheap.
// Keys and the model value, which vgw uses, are checked in full by their
// callers.
func (s *scanner) skipString() error {
	start := s.i + 1
	i := start
	for {
		q := quoteIndex(s.b[i:])
		if q < 0 {
			s.i = len(s.b)
			return s.fail("unterminated string")
		}
		i += q
		backslashes := 0
		for j := i - 1; j >= start && s.b[j] == '\\'; j-- {
			backslashes++
		}
		if backslashes%2 == 0 {
			s.i = i + 1
			return nil
		}
		i++ // an escaped quote
	}
}

// quoteIndex returns the index of the first '"' in b, or -1. JSON strings
// in requests are mostly short (keys, roles), where a plain loop beats a
// call into IndexByte, with some long ones (prompts, documents), where
// IndexByte's vector loop is many times faster: so the first 16 bytes are
// looked at one by one, the rest with IndexByte.
func quoteIndex(b []byte) int {
	head := b[:min(len(b), 16)]
	for i, c := range head {
		if c == '"' {
			return i
		}
	}
	if q := bytes.IndexByte(b[len(head):], '"'); q >= 0 {
		return len(head) + q
	}
	return -1
}

// stringValue reads the string at s.i strictly: control characters and
// invalid UTF-8 are errors, since this value becomes a route. It aliases the
// body unless the string holds escapes.
func (s *scanner) stringValue() ([]byte, error) {
	start := s.i + 1
	if err := s.skipString(); err != nil {
		return nil, err
	}
	raw := s.b[start : s.i-1]
	escaped := bytes.IndexByte(raw, '\\') >= 0
	for j, c := range raw {
		if c < 0x20 {
			return nil, &SyntaxError{Offset: start + j, msg: "control character in string"}
		}
	}
	if !escaped {
		if !utf8.Valid(raw) {
			return nil, &SyntaxError{Offset: start, msg: "invalid UTF-8 in string"}
		}
		return raw, nil
	}
	v, ok := unescape(make([]byte, 0, len(raw)), raw)
	if !ok || !utf8.Valid(v) {
		return nil, &SyntaxError{Offset: start, msg: "invalid escape in string"}
	}
	return v, nil
}

// nesting is a stack of container kinds, one bit each (set: object, clear:
// array). The first 64 levels live in a word; deeper ones, which only odd or
// hostile bodies reach, spill to a lazily allocated array.
type nesting struct {
	depth int
	low   uint64
	high  *[(MaxNesting + 63) / 64]uint64
}

func (n *nesting) push(object bool) bool {
	if n.depth == MaxNesting {
		return false
	}
	word, bit := &n.low, uint(n.depth)
	if n.depth >= 64 {
		if n.high == nil {
			n.high = new([(MaxNesting + 63) / 64]uint64)
		}
		word, bit = &n.high[n.depth/64], uint(n.depth%64)
	}
	if object {
		*word |= 1 << bit
	} else {
		*word &^= 1 << bit
	}
	n.depth++
	return true
}

// inObject reports whether the innermost open container is an object.
func (n *nesting) inObject() bool {
	top := n.depth - 1
	if top < 64 {
		return n.low&(1<<uint(top)) != 0
	}
	return n.high[top/64]&(1<<uint(top%64)) != 0
}

// skipValue moves past one JSON value of any kind. Nesting is tracked with a
// bit stack, not recursion, so hostile depth costs no goroutine stack.
func (s *scanner) skipValue() error {
	var n nesting
	for {
		// A value is expected here.
		s.skipSpace()
		if s.i >= len(s.b) {
			return s.fail("unexpected end of body")
		}
		switch c := s.b[s.i]; c {
		case '{', '[':
			if !n.push(c == '{') {
				return ErrTooDeep
			}
			s.i++
			s.skipSpace()
			if s.i < len(s.b) && s.b[s.i] == c+2 { // '}' is '{'+2, ']' is '['+2
				s.i++
				n.depth--
				break
			}
			if c == '{' {
				if _, err := s.key(); err != nil {
					return err
				}
			}
			continue
		case '"':
			if err := s.skipString(); err != nil {
				return err
			}
		default:
			if err := s.skipScalar(); err != nil {
				return err
			}
		}
		// A value ended; close containers until one wants another value.
		for {
			if n.depth == 0 {
				return nil
			}
			s.skipSpace()
			if s.i >= len(s.b) {
				return s.fail("unexpected end of body")
			}
			inObject := n.inObject()
			c := s.b[s.i]
			s.i++
			if c == ',' {
				if inObject {
					s.skipSpace()
					if _, err := s.key(); err != nil {
						return err
					}
				}
				break
			}
			if (inObject && c == '}') || (!inObject && c == ']') {
				n.depth--
				continue
			}
			s.i--
			return s.fail("expected ',' or a closing bracket")
		}
	}
}

// skipScalar moves past a number, true, false or null.
func (s *scanner) skipScalar() error {
	start := s.i
	for s.i < len(s.b) {
		c := s.b[s.i]
		if ('0' <= c && c <= '9') || ('a' <= c && c <= 'z') || c == '-' || c == '+' || c == '.' || c == 'E' {
			s.i++
			continue
		}
		break
	}
	tok := s.b[start:s.i]
	switch {
	case len(tok) == 0:
		return s.fail("expected a value")
	case string(tok) == "true", string(tok) == "false", string(tok) == "null":
		return nil
	case validNumber(tok):
		return nil
	}
	s.i = start
	return s.fail("invalid literal")
}

// validNumber reports whether tok follows JSON's number grammar.
func validNumber(tok []byte) bool {
	i := 0
	if i < len(tok) && tok[i] == '-' {
		i++
	}
	switch {
	case i < len(tok) && tok[i] == '0':
		i++
	case i < len(tok) && '1' <= tok[i] && tok[i] <= '9':
		i = digits(tok, i)
	default:
		return false
	}
	if i < len(tok) && tok[i] == '.' {
		if i = digits(tok, i+1); i < 0 {
			return false
		}
	}
	if i >= 0 && i < len(tok) && (tok[i] == 'e' || tok[i] == 'E') {
		i++
		if i < len(tok) && (tok[i] == '+' || tok[i] == '-') {
			i++
		}
		if i = digits(tok, i); i < 0 {
			return false
		}
	}
	return i == len(tok)
}

// digits returns the index after the run of digits starting at i, or -1
// if there is none.
func digits(tok []byte, i int) int {
	d := i
	for i < len(tok) && '0' <= tok[i] && tok[i] <= '9' {
		i++
	}
	if i == d {
		return -1
	}
	return i
}

func isHex4(b []byte) bool {
	for _, c := range b[:4] {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return true
}

func hex4(b []byte) rune {
	var r rune
	for _, c := range b[:4] {
		r <<= 4
		switch {
		case c <= '9':
			r |= rune(c - '0')
		case c <= 'F':
			r |= rune(c - 'A' + 10)
		default:
			r |= rune(c - 'a' + 10)
		}
	}
	return r
}

// unescape appends the decoded form of the JSON string contents raw to dst.
// A lone surrogate decodes to U+FFFD, as encoding/json does.
func unescape(dst, raw []byte) ([]byte, bool) {
	for i := 0; i < len(raw); {
		c := raw[i]
		if c != '\\' {
			dst = append(dst, c)
			i++
			continue
		}
		if i+1 >= len(raw) {
			return dst, false
		}
		switch raw[i+1] {
		case '"', '\\', '/':
			dst = append(dst, raw[i+1])
		case 'b':
			dst = append(dst, '\b')
		case 'f':
			dst = append(dst, '\f')
		case 'n':
			dst = append(dst, '\n')
		case 'r':
			dst = append(dst, '\r')
		case 't':
			dst = append(dst, '\t')
		case 'u':
			if i+6 > len(raw) || !isHex4(raw[i+2:i+6]) {
				return dst, false
			}
			r := hex4(raw[i+2 : i+6])
			i += 6
			if utf16.IsSurrogate(r) {
				if i+6 <= len(raw) && raw[i] == '\\' && raw[i+1] == 'u' && isHex4(raw[i+2:i+6]) {
					if d := utf16.DecodeRune(r, hex4(raw[i+2:i+6])); d != utf8.RuneError {
						r = d
						i += 6
					} else {
						r = utf8.RuneError
					}
				} else {
					r = utf8.RuneError
				}
			}
			dst = utf8.AppendRune(dst, r)
			continue
		default:
			return dst, false
		}
		i += 2
	}
	return dst, true
}
