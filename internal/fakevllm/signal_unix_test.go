//go:build unix

package fakevllm

import (
	"syscall"
	"testing"
)

func TestParseSignal(t *testing.T) {
	for _, name := range []string{"USR1", "SIGUSR1", "usr1"} {
		if sig, err := parseSignal(name); err != nil || sig != syscall.SIGUSR1 {
			t.Errorf("parseSignal(%q) = %v, %v; want SIGUSR1", name, sig, err)
		}
	}
	if sig, err := parseSignal("SIGUSR2"); err != nil || sig != syscall.SIGUSR2 {
		t.Errorf("parseSignal(SIGUSR2) = %v, %v", sig, err)
	}
	for _, name := range []string{"TERM", "KILL", "", "USR3"} {
		if _, err := parseSignal(name); err == nil {
			t.Errorf("parseSignal(%q) took it", name)
		}
	}
}
