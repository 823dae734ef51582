package main

import (
	"testing"

	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/manager"
)

var sink extproc.Lease

// TestLeaseHandOverAllocs: handing a manager's lease to extproc, as an
// extproc.Lease, allocates nothing: lease is one pointer wide, so the
// interface holds it directly.
func TestLeaseHandOverAllocs(t *testing.T) {
	var l manager.Lease
	if n := testing.AllocsPerRun(100, func() { sink = lease{l} }); n != 0 {
		t.Fatalf("%v allocs per lease handed over, want 0", n)
	}
}
