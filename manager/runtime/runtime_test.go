package runtime

import (
	"errors"
	"fmt"
	"testing"
)

func TestLogTail(t *testing.T) {
	tests := []struct {
		name   string
		writes []string
		want   string
	}{
		{"nothing", nil, ""},
		{"fewer lines than kept", []string{"a\nb\n"}, "a\nb"},
		{"the last three", []string{"1\n2\n3\n", "4\n5\n"}, "3\n4\n5"},
		{"a line split across writes", []string{"eng", "ine core ", "died\n"}, "engine core died"},
		{"the lines kept, then an unfinished one", []string{"0\n1\n2\n3\n4", "2"}, "1\n2\n3\n42"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := NewLogTail(3)
			for _, w := range tt.writes {
				if n, err := l.Write([]byte(w)); n != len(w) || err != nil {
					t.Fatalf("Write(%q) = %d, %v", w, n, err)
				}
			}
			if got := l.String(); got != tt.want {
				t.Errorf("String() = %q, want %q", got, tt.want)
			}
		})
	}
}

// TestPublicError: a runtime's error tells its public text through
// whatever wraps it, and matches itself.
func TestPublicError(t *testing.T) {
	missing := PublicError("the image is not on this Docker host")
	err := fmt.Errorf("%w: vllm/vllm-openai:v9; pull it", missing)
	var p interface{ Public() string }
	if !errors.As(err, &p) || p.Public() != "the image is not on this Docker host" {
		t.Errorf("the public text of %q: %v", err, p)
	}
	if !errors.Is(err, missing) {
		t.Error("the wrapped error is not its PublicError")
	}
}
