package secrets

import (
	"bytes"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"testing"
)

func TestRedact(t *testing.T) {
	var x Redactor
	if got := x.Redact("hf_abcdefgh"); got != "hf_abcdefgh" {
		t.Errorf("no secrets set: %q", got)
	}
	x.Set([]string{"hf_abcdefgh", "abcdef", "on", "hf_abcdefgh"})
	tests := []struct{ in, want string }{
		{"token hf_abcdefgh here", "token " + Mask + " here"},
		{"hf_abcdefghhf_abcdefgh", Mask + Mask},
		{"only abcdef", "only " + Mask},
		{"turned on", "turned on"}, // too short to be a secret
		{"", ""},
	}
	for _, tt := range tests {
		if got := x.Redact(tt.in); got != tt.want {
			t.Errorf("Redact(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
	x.Set(nil)
	if got := x.Redact("hf_abcdefgh"); got != "hf_abcdefgh" {
		t.Errorf("after Set(nil): %q", got)
	}
	var nilRedactor *Redactor
	if got := nilRedactor.Redact("x"); got != "x" {
		t.Errorf("nil redactor: %q", got)
	}
}

func TestReplaceAttr(t *testing.T) {
	var x Redactor
	x.Set([]string{"sk-secret-key"})
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{ReplaceAttr: x.ReplaceAttr}))
	log.Info("load failed sk-secret-key", slog.String("detail", "args --api-key sk-secret-key"),
		slog.Any("error", errors.New("exit: sk-secret-key")), slog.Int("n", 3))
	out := buf.String()
	// slog passes the message through ReplaceAttr too.
	if strings.Contains(out, "sk-secret-key") || strings.Count(out, Mask) != 3 || !strings.Contains(out, `"n":3`) {
		t.Errorf("not masked: %s", out)
	}
}

func TestFinders(t *testing.T) {
	env := InEnv(map[string]string{"HF_TOKEN": "hf_1", "CUDA_VISIBLE_DEVICES": "0", "OPENAI_API_KEY": "sk", "VLLM_LOGGING_LEVEL": "INFO"})
	slices.Sort(env)
	if !slices.Equal(env, []string{"hf_1", "sk"}) {
		t.Errorf("InEnv: %v", env)
	}
	args := InArgs([]string{"--api-key", "k1", "--max-num-seqs", "8", "--hf-token=t2", "--enforce-eager", "--api-key"})
	if !slices.Equal(args, []string{"k1", "t2"}) {
		t.Errorf("InArgs: %v", args)
	}
}
