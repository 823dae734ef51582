//go:build !unix

package fakevllm

import (
	"fmt"
	"os"
)

// parseSignal: there is no SIGUSR1 to wait for here.
func parseSignal(name string) (os.Signal, error) {
	return nil, fmt.Errorf("%q: no user signals on this system", name)
}
