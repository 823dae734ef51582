package manager

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/vgw-project/vgw/manager/gpu"
)

// Spec is what a runtime needs to start one model's server.
type Spec struct {
	Model string
	// Args are the vLLM server arguments vgw manages, built from the
	// model's settings (see vllm.Args).
	Args []string
	Env  map[string]string
	// GPUs are the GPUs the server runs on, by inventory index and UUID.
	GPUs []gpu.GPU
	// PerGPU is the memory it may use on each of them.
	PerGPU uint64
	// Signature identifies the settings that decide the server's memory
	// (see Signature), under which its footprint is learned.
	Signature string
	// Launch identifies everything the server is started with (see
	// LaunchSignature); a runtime labels the server with it, so that an
	// adopted server can be checked against the config.
	Launch string
	// Sim holds the fake's behaviour, for the sim runtime.
	Sim SimBehaviour
}

// SimBehaviour is how a fake vLLM started by the sim runtime behaves.
type SimBehaviour struct {
	StartupDelay    time.Duration
	TokensPerSecond float64
	FailStart       bool
	CrashAfter      int
	CrashMidStream  int
	SlowHealth      time.Duration
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

// Runtime starts and stops model servers: vLLM containers through Docker,
// or fake vLLM processes for sim. The manager calls it from worker
// goroutines, never from its own loop.
type Runtime interface {
	// Start starts a server for spec and returns once it runs; the
	// manager then polls its /health until it is ready.
	Start(ctx context.Context, spec Spec) (*Instance, error)
	// Stop stops it, gracefully for up to grace, then by force.
	Stop(ctx context.Context, inst *Instance, grace time.Duration) error
	// Exits reports every server that stops, whoever stopped it.
	Exits() <-chan Exit
	// Adopt lists the servers already running that vgw started before, so
	// that a restarted vgw keeps them instead of starting them again.
	Adopt(ctx context.Context) ([]*Instance, error)
	// PIDs lists the server's host process IDs as they are now, to find
	// its share of GPU memory: a server may start processes of its own
	// after it starts (vLLM's engine and tensor-parallel workers).
	PIDs(ctx context.Context, inst *Instance) ([]int, error)
}

// logTail keeps the last lines a server wrote, for the error of a failed
// load.
type logTail struct {
	mu    sync.Mutex
	lines []string
	part  strings.Builder
	keep  int
}

func newLogTail(keep int) *logTail { return &logTail{keep: keep} }

func (l *logTail) Write(p []byte) (int, error) {
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

func (l *logTail) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	lines := l.lines
	if l.part.Len() > 0 {
		lines = append(lines[:len(lines):len(lines)], l.part.String())
	}
	return strings.Join(lines, "\n")
}
