package extproc

import (
	"bytes"
	"errors"
)

// Uploads (OpenAI's /v1/audio/transcriptions and translations, and every
// Whisper client) are multipart/form-data (RFC 7578), with the model in
// a form field beside the file. The reader below finds that field in the
// buffered body without copying anything: it reads each part's headers,
// and skips a part's content, the file included, with one search for the
// next delimiter (bytes.Index: vectorised, at memory speed). The model
// field may come before the file or after it (the OpenAI Go SDK writes
// it after).

// Errors of the multipart reader.
var (
	// ErrNoBoundary: the content type says multipart but gives no usable
	// boundary (RFC 2046 §5.1.1: 1 to 70 characters).
	ErrNoBoundary = errors.New("multipart/form-data without a boundary parameter")
	// ErrMalformedForm: the body is not the multipart form its content
	// type announces.
	ErrMalformedForm = errors.New("the body is not well-formed multipart/form-data")
	// ErrNoModelField: the form has no "model" field.
	ErrNoModelField = errors.New(`the form has no "model" field`)
)

// FormBoundary returns the boundary of a multipart/form-data content
// type, and whether contentType is one; a multipart type without a
// usable boundary returns ok with a nil boundary. The boundary is a
// slice of contentType.
func FormBoundary(contentType []byte) (boundary []byte, ok bool) {
	mt, params, _ := bytes.Cut(contentType, []byte(";"))
	if !bytes.EqualFold(bytes.TrimSpace(mt), []byte("multipart/form-data")) {
		return nil, false
	}
	for len(params) > 0 {
		var p []byte
		p, params = nextParam(params)
		name, value, found := bytes.Cut(p, []byte("="))
		if !found || !bytes.EqualFold(bytes.TrimSpace(name), []byte("boundary")) {
			continue
		}
		value = unquote(bytes.TrimSpace(value))
		if len(value) == 0 || len(value) > 70 {
			return nil, true
		}
		return value, true
	}
	return nil, true
}

// nextParam cuts the next ;-separated parameter off params, minding
// quoted strings (a boundary or a name may hold a ';' in quotes).
func nextParam(params []byte) (p, rest []byte) {
	quoted := false
	for i := 0; i < len(params); i++ {
		switch params[i] {
		case '\\':
			if quoted {
				i++
			}
		case '"':
			quoted = !quoted
		case ';':
			if !quoted {
				return params[:i], params[i+1:]
			}
		}
	}
	return params, nil
}

// unquote strips the quotes of a quoted-string. Escapes (\") are left as
// they are: a value that needs one is compared as written, which only
// makes vgw miss a field no client names so.
func unquote(v []byte) []byte {
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		return v[1 : len(v)-1]
	}
	return v
}

// ExtractFormModel returns the value of the first "model" field of a
// multipart/form-data body with the given boundary, as a slice of body.
// It allocates nothing. Lines may end in CRLF, as RFC 2046 says, or in
// LF alone, as Go's mime/multipart also accepts.
func ExtractFormModel(body, boundary []byte) ([]byte, error) {
	start, end, err := formModel(body, boundary)
	if err != nil {
		return nil, err
	}
	return body[start:end], nil
}

// formModel is ExtractFormModel, saying where in body the value is.
func formModel(body, boundary []byte) (start, end int, err error) {
	found := false
	err = modelFields(body, boundary, func(s, e int) bool {
		start, end, found = s, e, true
		return false
	})
	if err == nil && !found {
		err = ErrNoModelField
	}
	return start, end, err
}

// modelFields calls visit with where each "model" field's value is, in
// order, until visit returns false. It reports a malformed form only up
// to where it stopped reading.
func modelFields(body, boundary []byte, visit func(start, end int) bool) error {
	if len(boundary) == 0 {
		return ErrNoBoundary
	}
	// The first delimiter may open the body or follow a preamble.
	i := delimiterAt(body, 0, boundary)
	if i < 0 {
		return ErrMalformedForm
	}
	pos := i + 2 + len(boundary)
	for {
		// After a delimiter: "--" closes the form; else its line ends
		// (delimiterAt saw to that).
		if bytes.HasPrefix(body[pos:], []byte("--")) {
			return nil
		}
		pos += bytes.IndexByte(body[pos:], '\n') + 1
		// The part's headers, up to an empty line.
		isModel := false
		for {
			eol := bytes.IndexByte(body[pos:], '\n')
			if eol < 0 {
				return ErrMalformedForm
			}
			line := bytes.TrimSuffix(body[pos:pos+eol], []byte("\r"))
			pos += eol + 1
			if len(line) == 0 {
				break
			}
			if name, value, ok := bytes.Cut(line, []byte(":")); ok && bytes.EqualFold(bytes.TrimSpace(name), []byte("content-disposition")) {
				isModel = isModelField(value)
			}
		}
		// The part's content, up to the next delimiter, which starts its
		// own line: the line break before it belongs to the delimiter.
		next := delimiterAt(body, pos, boundary)
		if next < 0 {
			return ErrMalformedForm
		}
		if isModel {
			end := next
			if end > pos && body[end-1] == '\n' {
				end--
				if end > pos && body[end-1] == '\r' {
					end--
				}
			}
			if !visit(pos, end) {
				return nil
			}
		}
		pos = next + 2 + len(boundary)
	}
}

// delimiterAt returns where the next delimiter line begins, at or after
// from, or -1: "--boundary" at the start of a line, followed by "--"
// (the close) or by nothing but padding to the line's end. A line that
// only starts so is content (RFC 2046 §5.1.1).
func delimiterAt(body []byte, from int, boundary []byte) int {
	for from <= len(body) {
		i := bytes.Index(body[from:], boundary)
		if i < 0 {
			return -1
		}
		at := from + i - 2 // the "--" before the boundary
		if at >= 0 && body[at] == '-' && body[at+1] == '-' && (at == 0 || body[at-1] == '\n') && delimiterEnds(body[from+i+len(boundary):]) {
			return at
		}
		from += i + 1
	}
	return -1
}

// delimiterEnds reports whether what follows a boundary ends its
// delimiter line: "--", or padding and a line break.
func delimiterEnds(rest []byte) bool {
	if bytes.HasPrefix(rest, []byte("--")) {
		return true
	}
	for _, c := range rest {
		switch c {
		case ' ', '\t', '\r':
		case '\n':
			return true
		default:
			return false
		}
	}
	return false
}

// isModelField reports whether a Content-Disposition value is that of a
// form field named model: form-data; name="model" (or name=model), with
// no filename, which would make it a file called so.
func isModelField(value []byte) bool {
	disposition, params := nextParam(value)
	if !bytes.EqualFold(bytes.TrimSpace(disposition), []byte("form-data")) {
		return false
	}
	named := false
	for len(params) > 0 {
		var p []byte
		p, params = nextParam(params)
		name, v, _ := bytes.Cut(p, []byte("="))
		name = bytes.TrimSpace(name)
		switch {
		case bytes.EqualFold(name, []byte("name")):
			named = string(unquote(bytes.TrimSpace(v))) == "model"
		case bytes.EqualFold(name, []byte("filename")), bytes.EqualFold(name, []byte("filename*")):
			return false
		}
	}
	return named
}
