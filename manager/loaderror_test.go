package manager

import (
	"fmt"
	"strings"
	"testing"

	"github.com/vgw-project/vgw/manager/runtime"
)

// TestLoadErrorPublic: what a client is told of a failed load names the
// kind of failure and nothing of the server's log, the Docker daemon's
// address or a path, while the whole error keeps them for operators.
func TestLoadErrorPublic(t *testing.T) {
	tests := []struct {
		name   string
		err    error
		public string
	}{
		{"exited", &exitError{runtime.Exit{Reason: "exited", Code: 1, LogTail: "--api-key sk-secret"}}, "its server exited (exited, code 1)"},
		{"exited as it started", fmt.Errorf("container vgw-a exited as it started; last log lines: --api-key sk-secret"), "its server could not be started"},
		{"never healthy", fmt.Errorf("%w %v", ErrLoadTimeout, "15m0s"), "not healthy within load_timeout"},
		// A runtime's error says what clients may be told (the Docker
		// runtime's errors are runtime.PublicErrors: see its TestLoadErrorPublic).
		{"Docker away", fmt.Errorf("create container vgw-a: %w at tcp://10.1.2.3:2376: is dockerd running?", runtime.PublicError("the Docker daemon cannot be reached")), "the Docker daemon cannot be reached"},
		{"image missing", fmt.Errorf("image vllm/vllm-openai:v9 %w: docker pull it", runtime.PublicError("the image is not on this Docker host")), "the image is not on this Docker host"},
		{"runtime away, no public text", fmt.Errorf("runtime at tcp://10.1.2.3:2376: %w", runtime.ErrUnreachable), "its server could not be started"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := &LoadError{Model: "a", Err: tt.err, LogTail: "--api-key sk-secret"}
			if got, want := e.Public(), "model a failed to load: "+tt.public; got != want {
				t.Errorf("Public() = %q, want %q", got, want)
			}
			for _, hidden := range []string{"sk-secret", "10.1.2.3", "vllm/vllm-openai"} {
				if strings.Contains(e.Public(), hidden) {
					t.Errorf("Public() shows %q", hidden)
				}
			}
			if !strings.Contains(e.Error(), "sk-secret") {
				t.Error("Error() lost the detail operators need")
			}
		})
	}
}
