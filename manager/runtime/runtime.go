// Package runtime is what the GPU manager and the runtimes that run model
// servers for it (docker, sim) share: the Spec of a server to start, the
// Instance that runs, the Exit that ends it, and the errors by which a
// runtime tells the manager what kind of failure it met, without the
// manager knowing Docker. The manager declares the Runtime interface it
// calls; the runtimes import this package, never the manager.
package runtime

import (
	"errors"
	"strings"
	"sync"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/manager/gpu"
)

// Spec is what a runtime needs to start one model's server.
type Spec struct {
	Model string
	// Config is the model's settings (never nil), from which each runtime
	// builds what it starts: vLLM's command line (see vllm.Args), and for
	// sim its fake's behaviour (Config.Sim).
	Config *config.Model
	// Utilization is the --gpu-memory-utilization the manager computed:
	// the model's own setting, else its share of its GPUs' memory.
	Utilization float64
	// Sleep is the model's sleep setting: with a level, its server is
	// started in sleep mode (see vllm.Args), and the manager may put it
	// to sleep at that level (Sleeper).
	Sleep config.Sleep
	Env   map[string]string
	// GPUs are the GPUs the server runs on, by inventory index and UUID.
	GPUs []gpu.GPU
	// PerGPU is the memory it may use on each of them.
	PerGPU uint64
	// Signature identifies the settings that decide the server's memory
	// (see manager.Signature), under which its footprint is learned.
	Signature string
	// Launch identifies everything the server is started with (see
	// manager.LaunchSignature); a runtime labels the server with it, so
	// that an adopted server can be checked against the config.
	Launch string
}

// Instance is a running model server.
type Instance struct {
	ID        string // the runtime's name for it: container ID, process ID
	Model     string
	Addr      string // host:port where it serves HTTP
	PIDs      []int  // its host process IDs, to attribute GPU memory
	GPUs      []int
	Signature string
	Launch    string
}

// Exit reports that an instance's server stopped, asked to or not.
type Exit struct {
	ID     string
	Model  string
	Code   int
	Reason string // "exited", "killed", "oom", ...
	// Requested says the exit was asked for with Stop.
	Requested bool
	// Removed says someone else removed the server (docker rm -f): it
	// says nothing about the model, which is started again.
	Removed bool
	// LogTail is the end of its log, which says why a load failed.
	LogTail string
}

// ErrUnreachable says the runtime itself cannot be reached (the Docker
// daemon, say), which says nothing about the model: the manager retries
// a load that failed so at the first backoff interval however long the
// outage, instead of doubling the wait. A runtime's errors wrap it, or
// match it (errors.Is).
var ErrUnreachable = errors.New("the runtime cannot be reached")

// PublicError is a failure a model's clients may be told of, in words vgw
// chose: its whole text is Public. A runtime wraps it in an error that
// adds the detail (the daemon's address, the image, what to do), which
// only operators read.
type PublicError string

func (e PublicError) Error() string { return string(e) }

// Public is what a client of the model is told.
func (e PublicError) Public() string { return string(e) }

// LogTail keeps the last lines a server wrote, for the error of a failed
// load.
type LogTail struct {
	mu    sync.Mutex
	lines []string
	part  strings.Builder
	keep  int
}

// NewLogTail keeps the last keep lines.
func NewLogTail(keep int) *LogTail { return &LogTail{keep: keep} }

// Write takes what the server wrote; it never fails.
func (l *LogTail) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range string(p) {
		if c != '\n' {
			l.part.WriteRune(c)
			continue
		}
		l.lines = append(l.lines, l.part.String())
		l.part.Reset()
		if len(l.lines) > l.keep {
			l.lines = l.lines[len(l.lines)-l.keep:]
		}
	}
	return len(p), nil
}

// String is the lines kept, the unfinished last one included.
func (l *LogTail) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	lines := l.lines
	if l.part.Len() > 0 {
		lines = append(lines[:len(lines):len(lines)], l.part.String())
	}
	return strings.Join(lines, "\n")
}

// LastLines returns the last n lines of s: the end of a server's log, for
// an error or an event.
func LastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
