// Package secrets keeps credentials out of what vgw shows: logs, status,
// events and error messages. A Redactor knows the secret values in force
// (the Hugging Face token, credentials in a model's env or extra_args, the
// admin token) and replaces each where it appears, because text vgw did
// not write itself (a model server's log tail, say) may repeat them.
package secrets

import (
	"cmp"
	"log/slog"
	"slices"
	"strings"
	"sync/atomic"
)

// Mask replaces every secret.
const Mask = "[redacted]"

// minLen is the shortest value treated as a secret: masking every "1" or
// "on" in the logs would hide more than it protects.
const minLen = 6

// Redactor replaces known secret values in text. Its zero value knows
// none; Set may be called at any time, from any goroutine.
type Redactor struct {
	r atomic.Pointer[strings.Replacer]
}

// Set makes values the secrets to mask, replacing those set before.
func (x *Redactor) Set(values []string) {
	var vs []string
	for _, v := range values {
		if len(v) >= minLen && !slices.Contains(vs, v) {
			vs = append(vs, v)
		}
	}
	if len(vs) == 0 {
		x.r.Store(nil)
		return
	}
	// Longest first, so that a secret containing another is masked whole.
	slices.SortFunc(vs, func(a, b string) int { return cmp.Compare(len(b), len(a)) })
	pairs := make([]string, 0, 2*len(vs))
	for _, v := range vs {
		pairs = append(pairs, v, Mask)
	}
	x.r.Store(strings.NewReplacer(pairs...))
}

// Redact returns s with every secret masked.
func (x *Redactor) Redact(s string) string {
	if x == nil {
		return s
	}
	if r := x.r.Load(); r != nil {
		return r.Replace(s)
	}
	return s
}

// ReplaceAttr masks secrets in a log attribute's text; use it as
// slog.HandlerOptions.ReplaceAttr. With no secrets set it costs one atomic
// load per attribute.
func (x *Redactor) ReplaceAttr(_ []string, a slog.Attr) slog.Attr {
	if x.r.Load() == nil {
		return a
	}
	switch a.Value.Kind() {
	case slog.KindString:
		a.Value = slog.StringValue(x.Redact(a.Value.String()))
	case slog.KindAny:
		switch v := a.Value.Any().(type) {
		case error:
			a.Value = slog.StringValue(x.Redact(v.Error()))
		case interface{ String() string }:
			a.Value = slog.StringValue(x.Redact(v.String()))
		}
	}
	return a
}

// credentialWords mark an env name or a flag as holding a credential.
var credentialWords = []string{"TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH"}

// IsCredential reports whether an env variable or a command-line flag
// with this name holds a credential: HF_TOKEN, OPENAI_API_KEY, --api-key.
func IsCredential(name string) bool {
	n := strings.ToUpper(name)
	for _, w := range credentialWords {
		if strings.Contains(n, w) {
			return true
		}
	}
	return false
}

// InEnv returns the values of the credentials in env.
func InEnv(env map[string]string) []string {
	var out []string
	for k, v := range env {
		if IsCredential(k) {
			out = append(out, v)
		}
	}
	return out
}

// InArgs returns the values given to credential flags in args, as
// "--api-key VALUE" or "--api-key=VALUE".
func InArgs(args []string) []string {
	var out []string
	for i, a := range args {
		if !strings.HasPrefix(a, "-") {
			continue
		}
		name, value, hasValue := strings.Cut(a, "=")
		if !IsCredential(name) {
			continue
		}
		if hasValue {
			out = append(out, value)
		} else if i+1 < len(args) {
			out = append(out, args[i+1])
		}
	}
	return out
}
