package manager

import (
	"context"
	"time"

	"github.com/vgw-project/vgw/manager/runtime"
)

// Runtime starts and stops model servers: vLLM containers through Docker
// (runtime/docker), or fake vLLM processes for sim (runtime/sim). The
// manager calls it from worker goroutines, and from its loop only once,
// as it starts, to adopt what runs (Adopt, bounded by adoptTimeout).
type Runtime interface {
	// Start starts a server for spec and returns once it runs; the
	// manager then polls its /health until it is ready. An error that
	// wraps runtime.ErrUnreachable says the runtime itself could not be
	// reached; one that carries a Public text (runtime.PublicError) says
	// what the model's clients are told.
	Start(ctx context.Context, spec runtime.Spec) (*runtime.Instance, error)
	// Stop stops it, gracefully for up to grace, then by force.
	Stop(ctx context.Context, inst *runtime.Instance, grace time.Duration) error
	// Exits reports every server that stops, whoever stopped it.
	Exits() <-chan runtime.Exit
	// Adopt lists the servers already running that vgw started before, so
	// that a restarted vgw keeps them instead of starting them again.
	Adopt(ctx context.Context) ([]*runtime.Instance, error)
	// PIDs lists the server's host process IDs as they are now, to find
	// its share of GPU memory: a server may start processes of its own
	// after it starts (vLLM's engine and tensor-parallel workers).
	PIDs(ctx context.Context, inst *runtime.Instance) ([]int, error)
}

// Sleeper is a Runtime whose servers can sleep: vLLM's sleep mode, for
// servers started with a sleep level (runtime.Spec.Sleep). The manager
// calls it from worker goroutines. A Runtime that is not a Sleeper runs
// every model as if its sleep were off.
type Sleeper interface {
	// Sleep puts inst to sleep at level (1 or 2). No request of it may be
	// in flight.
	Sleep(ctx context.Context, inst *runtime.Instance, level int) error
	// Wake wakes inst, asleep at level; level 0 says the level is not
	// known (a sleeper adopted from an earlier vgw), which is woken as
	// level 2 is, the sequence that wakes either.
	Wake(ctx context.Context, inst *runtime.Instance, level int) error
	// IsSleeping asks inst whether it sleeps.
	IsSleeping(ctx context.Context, inst *runtime.Instance) (bool, error)
	// WarmUp sends inst, just loaded, the one request that makes the
	// next one as fast as the rest (see vllm.WarmUp).
	WarmUp(ctx context.Context, inst *runtime.Instance, spec runtime.Spec) error
	// HostMemory is the host memory inst holds now: read before and
	// after a sleep, the rise is what it holds asleep.
	HostMemory(ctx context.Context, inst *runtime.Instance) (uint64, error)
}

// LogFollower is a Runtime that can follow what a server writes, so that
// a loading model's progress is read from its log (vllm.ParseProgress).
type LogFollower interface {
	// FollowLog calls line for each line inst writes until ctx ends or
	// inst stops, beginning with what it wrote since since where the
	// runtime keeps its log (a server just started has written lines
	// before anyone could follow; an adopted one, a whole old log).
	FollowLog(ctx context.Context, inst *runtime.Instance, since time.Time, line func(string)) error
}
