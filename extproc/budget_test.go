package extproc

import (
	"strings"
	"testing"
	"time"
)

// TestBudget: a minute's worth at once, then one per refill interval; a
// debt refuses until it has refilled; a refund gives back what was taken.
func TestBudget(t *testing.T) {
	t0 := time.Unix(1000, 0)
	b := newBudget(3) // one per 20s
	for i := range 3 {
		if w := b.take(t0); w != 0 {
			t.Fatalf("request %d refused for %v", i, w)
		}
	}
	if w := b.take(t0); w != 20*time.Second {
		t.Fatalf("fourth told %v, want 20s", w)
	}
	if w := b.take(t0.Add(20 * time.Second)); w != 0 {
		t.Fatalf("after 20s refused for %v", w)
	}
	b.spend(t0.Add(20*time.Second), -1) // given back
	if w := b.take(t0.Add(20 * time.Second)); w != 0 {
		t.Fatalf("after a refund refused for %v", w)
	}

	tokens := newBudget(1000) // 60ms a token
	if w := tokens.empty(t0); w != 0 {
		t.Fatalf("a fresh token budget is empty for %v", w)
	}
	tokens.spend(t0, 600)
	if w := tokens.empty(t0); w != 0 {
		t.Fatalf("600 of 1000 spent: empty for %v", w)
	}
	tokens.spend(t0, 600) // 200 in debt: 12s to refill
	if w := tokens.empty(t0); w != 12*time.Second {
		t.Fatalf("200 tokens in debt: empty for %v, want 12s", w)
	}
	if w := tokens.empty(t0.Add(12 * time.Second)); w != 0 {
		t.Fatalf("12s later still empty for %v", w)
	}
	// Idle for an hour, it holds a minute's worth, no more.
	later := t0.Add(time.Hour)
	tokens.spend(later, 1000)
	if w := tokens.empty(later); w != 0 {
		t.Fatalf("a minute's worth after an hour: empty for %v", w)
	}
	tokens.spend(later, 1)
	if w := tokens.empty(later); w != 60*time.Millisecond {
		t.Fatalf("one over: empty for %v, want 60ms", w)
	}
}

func TestUsageMeter(t *testing.T) {
	sse := "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n" +
		"data: {\"choices\":[{\"delta\":{\"content\":\" there\"}}]}\n\n" +
		"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"total_tokens\":612,\"completion_tokens\":602}}\n\n" +
		"data: [DONE]\n\n"
	json := `{"id":"x","choices":[{"message":{"content":"\"total_tokens\": 3"}}],"usage":{"prompt_tokens":5,"total_tokens" : 77,"completion_tokens":72}}`
	tests := []struct {
		name   string
		body   string
		reqLen int
		want   int64
		// whole: the figure is an estimate from events counted, read from
		// the whole body only (an event's start cut in two is not
		// counted).
		whole bool
	}{
		{"a stream's usage", sse, 400, 612, false},
		{"a JSON answer's usage, after a figure quoted in its text", json, 400, 77, false},
		{"no usage: one per event, and the prompt by its bytes", strings.Split(sse, "data: {\"choices\":[],")[0], 400, 2 + 100, true},
		{"nothing", "", 40, 10, false},
		{"a figure cut off at the end is not read", `{"usage":{"total_tokens":9`, 0, 0, false},
	}
	for _, tt := range tests {
		read := func(chunks ...string) int64 {
			m := newUsageMeter()
			for _, c := range chunks {
				m.read([]byte(c))
			}
			return m.tokens(tt.reqLen)
		}
		if got := read(tt.body); got != tt.want {
			t.Errorf("%s: %d tokens, want %d", tt.name, got, tt.want)
		}
		if tt.whole {
			continue
		}
		for cut := 0; cut <= len(tt.body); cut++ {
			if got := read(tt.body[:cut], tt.body[cut:]); got != tt.want {
				t.Fatalf("%s, cut at %d: %d tokens, want %d", tt.name, cut, got, tt.want)
			}
		}
		bytes := strings.Split(tt.body, "")
		if got := read(bytes...); got != tt.want {
			t.Errorf("%s, a byte at a time: %d tokens, want %d", tt.name, got, tt.want)
		}
	}
}

// FuzzUsageMeter: however a body is cut into chunks, the meter reads the
// same figure as from the whole body, and never panics.
func FuzzUsageMeter(f *testing.F) {
	f.Add([]byte(`{"usage":{"total_tokens":42}}`), uint8(7), uint8(3))
	f.Add([]byte("data: {\"usage\":{\"total_tokens\": 1234}}\n\ndata: [DONE]\n\n"), uint8(20), uint8(1))
	f.Fuzz(func(t *testing.T, body []byte, a, b uint8) {
		whole := newUsageMeter()
		whole.read(body)
		i, j := min(int(a), len(body)), min(int(a)+int(b), len(body))
		parts := newUsageMeter()
		parts.read(body[:i])
		parts.read(body[i:j])
		parts.read(body[j:])
		if whole.total != parts.total {
			t.Fatalf("whole read %d, in parts at %d and %d %d", whole.total, i, j, parts.total)
		}
	})
}
