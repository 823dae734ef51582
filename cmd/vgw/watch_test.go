package main

import (
	"slices"
	"testing"
)

// TestSettledChange: a new content is reported once, after it has held for
// two checks; content that changes at every check, or a file that cannot
// be read, is not reported; going back to the content in force is no
// change.
func TestSettledChange(t *testing.T) {
	a, b, c := []byte("a"), []byte("b"), []byte("c")
	tests := []struct {
		name   string
		checks [][]byte
		want   []int // the checks that report a change
	}{
		{"unchanged", [][]byte{a, a, a}, nil},
		{"changed once", [][]byte{b, b, b, b}, []int{1}},
		{"written in place: empty, half, whole", [][]byte{c, b, b}, []int{2}},
		{"changing at every check", [][]byte{b, c, b, c}, nil},
		{"unreadable while replaced", [][]byte{nil, nil, b, b}, []int{3}},
		{"back to what is in force", [][]byte{b, a, a}, nil},
		{"changed twice", [][]byte{b, b, c, c, c}, []int{1, 3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := &settledChange{last: a, seen: a}
			var got []int
			for i, now := range tt.checks {
				if d.check(now) {
					got = append(got, i)
				}
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("reported at checks %v, want %v", got, tt.want)
			}
		})
	}
}
