package manager

import (
	"bufio"
	"strings"
	"testing"
)

func TestParseMemTotal(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want uint64
	}{
		{"MemTotal:       263842176 kB\nMemFree:  1 kB\n", 263842176 << 10},
		{"MemFree:  1 kB\nMemTotal: 1024 kB\n", 1 << 20},
		{"MemTotal: lots kB\n", 0},
		{"", 0},
	} {
		if got := parseMemTotal(bufio.NewScanner(strings.NewReader(tt.in))); got != tt.want {
			t.Errorf("parseMemTotal(%q) = %d, want %d", tt.in, got, tt.want)
		}
	}
	if memTotal() == 0 {
		t.Error("memTotal read nothing from this machine's /proc/meminfo")
	}
}
