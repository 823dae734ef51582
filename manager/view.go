package manager

import (
	"slices"
	"sync/atomic"
	"time"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/manager/gpu"
)

// A View is every model and GPU as the manager last decided, at one
// moment. The manager publishes a new View each time anything in it
// changes and never changes one after: the xDS server builds Envoy's
// clusters from it, the admin service reports it, and the request path
// reads it to lease a ready model without asking the manager's loop.
type View struct {
	// Version counts the views this manager has published.
	Version uint64
	// Models are every model the manager knows, in name order: the
	// configured ones, and those that left the config and are still
	// finishing their requests (Removed).
	Models []ModelView
	// GPUs are the GPUs with their memory in use at the latest reading.
	GPUs []GPUStatus
	// HostUsed is the host memory sleeping models hold, and HostBudget
	// what they may (host_memory).
	HostUsed, HostBudget uint64

	byName map[string]*ModelView
	next   chan struct{} // closed once a newer View is published
}

// Model returns the model called name, or nil.
func (v *View) Model(name string) *ModelView { return v.byName[name] }

// Changed is closed once a newer View has been published.
func (v *View) Changed() <-chan struct{} { return v.next }

// ModelView is one model in a View.
type ModelView struct {
	Name  string
	State State
	// Removed says the model has left the config: it takes no new
	// requests, and is unloaded once those in flight are done.
	Removed bool
	// Endpoint is where the model takes requests (host:port): its
	// server's address while it is Ready, "" otherwise.
	Endpoint string
	// Addr and Instance are where its server serves and the runtime's
	// name for it, while it has one (loading and draining too).
	Addr     string
	Instance string
	GPUs     []int
	PerGPU   uint64
	// Footprint is where PerGPU comes from: declared, learned,
	// utilization or default.
	Footprint string
	Limits    config.Limits
	Since     time.Time // when it was placed, or became ready
	AlwaysOn  bool
	Pinned    bool
	// Waiting counts the requests waiting for the model to be ready.
	Waiting int
	// LastError says why the model is not ready: why its last load
	// failed, or why it cannot be placed; "" when nothing went wrong.
	LastError string
	// RetryAt is when a model whose load failed is tried again.
	RetryAt time.Time
	// SleepLevel is the level a sleeping model sleeps at (0 when it is
	// awake, or adopted asleep at a level not known), Residual what it
	// keeps of each of its GPUs and HostMemory what it holds of host
	// memory; all set while it sleeps or wakes.
	SleepLevel int
	Residual   uint64
	HostMemory uint64
	// While its server starts or wakes: when that began, the phase of its
	// start its log last told ("" before it told any: vllm.Phase) and how
	// far through it (0-100, -1 where the log does not say), and how long
	// its last load (or wake) took, 0 when none is known.
	Began    time.Time
	Phase    string
	Percent  float64
	Expected time.Duration

	use *use // live: changes with every request, unlike the rest
}

// InFlight is how many requests hold a lease on the model now.
func (m *ModelView) InFlight() int64 { return m.use.inflight.Load() }

// LastUsed is when a request last took or gave back a lease on the model;
// zero when none ever did.
func (m *ModelView) LastUsed() time.Time {
	if t := m.use.lastUsed.Load(); t != 0 {
		return time.Unix(0, t)
	}
	return time.Time{}
}

// GPUStatus is one GPU with its latest reading.
type GPUStatus struct {
	gpu.GPU
	Used uint64
}

// use is a model's requests, counted by the request path without the
// manager's loop: the one in-flight count of the model. It lives as long
// as the model's record, across restarts of its server.
type use struct {
	inflight atomic.Int64
	lastUsed atomic.Int64 // unix nanos, from the board's coarse clock
	board    *board
}

// release counts a request out of the model called name, and rings the
// loop when that was the last request of a draining model.
func (u *use) release(name string) {
	if u.inflight.Add(-1) == 0 {
		if mv := u.board.view().Model(name); mv != nil && mv.State == Draining {
			u.board.ring()
		}
	}
}

// board is where the manager's loop and the request path meet: the loop
// pins the latest View on it and keeps a coarse clock there (a clock the
// request path can afford: one atomic load); the request path reads them,
// and rings the bell when a draining model's last request ends.
type board struct {
	cur     atomic.Pointer[View]
	version uint64 // of the last View published; the loop's
	coarse  atomic.Int64
	bell    chan struct{}
}

func newBoard(now time.Time) *board {
	b := &board{bell: make(chan struct{}, 1)}
	b.coarse.Store(now.UnixNano())
	return b
}

// view returns the latest View.
func (b *board) view() *View { return b.cur.Load() }

// publish pins v as the latest View, numbered next, and closes the
// previous one's Changed channel. Only the loop publishes.
func (b *board) publish(v *View) {
	b.version++
	v.Version, v.next = b.version, make(chan struct{})
	if old := b.cur.Swap(v); old != nil {
		close(old.next)
	}
}

// ring asks the loop to look again, without blocking.
func (b *board) ring() {
	select {
	case b.bell <- struct{}{}:
	default:
	}
}

// Views publishes Views one after another, each closing the previous
// one's Changed channel, as a Manager does: for what reads Views and
// wants to be driven by Views of its own making, such as its tests.
type Views struct{ b *board }

// NewViews returns a publisher that has published nothing yet.
func NewViews() *Views { return &Views{b: newBoard(time.Time{})} }

// Publish publishes a View of models, in the order given, and gpus. Each
// model's counts start at zero.
func (vs *Views) Publish(models []ModelView, gpus []GPUStatus) *View {
	v := &View{Models: slices.Clone(models), GPUs: slices.Clone(gpus), byName: make(map[string]*ModelView, len(models))}
	for i := range v.Models {
		v.Models[i].use = &use{board: vs.b}
		v.byName[v.Models[i].Name] = &v.Models[i]
	}
	vs.b.publish(v)
	return v
}

// View returns the latest View published, or nil.
func (vs *Views) View() *View { return vs.b.view() }
