package runtime

import (
	"slices"
	"strings"
	"testing"
)

func TestLines(t *testing.T) {
	tests := []struct {
		name   string
		writes []string
		want   []string
	}{
		{"lines", []string{"a\nb\n"}, []string{"a", "b"}},
		{"split across writes", []string{"ab", "c\nd", "e\n"}, []string{"abc", "de"}},
		{"a bar redrawn in place", []string{"x:  25%|1/4\rx:  50%|2/4\rx: 100%|4/4\n"}, []string{"x:  25%|1/4", "x:  50%|2/4", "x: 100%|4/4"}},
		{"blank lines and CRLF are no lines", []string{"a\r\n\nb\n"}, []string{"a", "b"}},
		{"unfinished: not yet a line", []string{"a\nb"}, []string{"a"}},
		{"long lines cut", []string{strings.Repeat("x", 5000) + "\nok\n"}, []string{strings.Repeat("x", maxLine), "ok"}},
		{"long lines cut across writes", []string{strings.Repeat("x", 3000), strings.Repeat("y", 3000) + "\n"}, []string{strings.Repeat("x", 3000) + strings.Repeat("y", maxLine-3000)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			l := NewLines(func(s string) { got = append(got, s) })
			for _, w := range tt.writes {
				if n, err := l.Write([]byte(w)); n != len(w) || err != nil {
					t.Fatalf("Write = %d, %v", n, err)
				}
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("lines %q, want %q", got, tt.want)
			}
		})
	}
}

func TestFollowers(t *testing.T) {
	var f Followers
	f.Write([]byte("before\n")) // nobody follows: dropped
	var a, b []string
	stopA := f.Follow(func(s string) { a = append(a, s) })
	stopB := f.Follow(func(s string) { b = append(b, s) })
	f.Write([]byte("one\ntw"))
	stopA()
	f.Write([]byte("o\nthree\n"))
	stopB()
	f.Write([]byte("four\n"))
	if !slices.Equal(a, []string{"one"}) || !slices.Equal(b, []string{"one", "two", "three"}) {
		t.Errorf("a %q, b %q", a, b)
	}
	// Half a line written as the last follower leaves is not glued to
	// the next follower's first.
	var c []string
	stopC := f.Follow(func(s string) {})
	f.Write([]byte("ha"))
	stopC()
	f.Follow(func(s string) { c = append(c, s) })
	f.Write([]byte("lf\nfive\n"))
	if !slices.Equal(c, []string{"lf", "five"}) {
		t.Errorf("c %q", c)
	}
}
