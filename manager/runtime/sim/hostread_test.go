package sim_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/manager/runtime"
)

// failFirstHost fails its first read of host memory (the one before a
// sleep), and adds a baseline to every read, as a container's own memory.
type failFirstHost struct {
	*countingRuntime
	calls *atomic.Int32
}

func (h failFirstHost) HostMemory(ctx context.Context, inst *runtime.Instance) (uint64, error) {
	if h.calls.Add(1) == 1 {
		return 0, errors.New("stats: daemon busy")
	}
	n, err := h.countingRuntime.HostMemory(ctx, inst)
	return n + 8<<30, err
}

// TestSleepHostReadFails: when the read of host memory before a sleep
// fails, what the sleep added is not known, and the model is counted as
// holding what was foreseen, not the whole reading after it (its own
// baseline included).
func TestSleepHostReadFails(t *testing.T) {
	var calls atomic.Int32
	tm := startWrapped(t, sleepSetup{}.config()+"models:\n"+sleepyModel("a", "40GiB"), func(rt *countingRuntime) manager.Runtime {
		return failFirstHost{rt, &calls}
	})
	if err := tm.ensure("a"); err != nil {
		t.Fatal(err)
	}
	if err := tm.Sleep(context.Background(), "a", true); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "a asleep", func() bool { return tm.status("a").State == manager.Sleeping })
	if got, real := tm.status("a").HostMemory, tm.rt.Host(); got < real || got > 40<<30 {
		t.Errorf("a counted as holding %d GiB of host memory asleep; the sleep added %d GiB, its footprint is 40", got>>30, real>>30)
	}
}
