//go:build unix

package fakevllm

import (
	"fmt"
	"os"
	"strings"
	"syscall"
)

// parseSignal reads the signal --ready-on-signal names: USR1 or USR2,
// with or without SIG, as docker kill --signal takes them. Others mean
// something to a process already (TERM stops the fake) and are refused.
func parseSignal(name string) (os.Signal, error) {
	switch strings.TrimPrefix(strings.ToUpper(name), "SIG") {
	case "USR1":
		return syscall.SIGUSR1, nil
	case "USR2":
		return syscall.SIGUSR2, nil
	}
	return nil, fmt.Errorf("%q: want USR1 or USR2", name)
}
