package poll

import (
	"sync/atomic"
	"testing"
	"time"
)

// recorder is a testing.TB that records a failure instead of stopping.
type recorder struct {
	testing.TB
	failed atomic.Bool
	msg    string
}

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(format string, args ...any) {
	r.failed.Store(true)
	r.msg = format
}

func TestWithin(t *testing.T) {
	var n atomic.Int32
	r := &recorder{TB: t}
	Within(r, time.Minute, "the third poll", func() bool { return n.Add(1) == 3 })
	if r.failed.Load() || n.Load() != 3 {
		t.Fatalf("a condition that comes true: failed %v after %d polls", r.failed.Load(), n.Load())
	}
	r = &recorder{TB: t}
	Within(r, 10*time.Millisecond, "never", func() bool { return r.failed.Load() })
	if !r.failed.Load() {
		t.Fatal("a condition that never holds did not fail the test")
	}
}
