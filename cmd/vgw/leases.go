package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/vgw-project/vgw/admin"
	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/xds"
)

// Where the parts meet: each implementation is checked against the
// interface its consumer declares.
var (
	_ extproc.Leases  = leases{}
	_ extproc.Lease   = lease{}
	_ xds.Source      = (*manager.Manager)(nil)
	_ admin.Manager   = (*manager.Manager)(nil)
	_ admin.Admission = (*extproc.Server)(nil)
	_ admin.Envoys    = (*xds.Server)(nil)
)

// leases is what the request path asks for: the manager's lease on a
// model, once the request's Envoy knows where the model runs (xDS).
type leases struct {
	mgr *manager.Manager
	xds *xds.Server
}

// lease is a manager's lease as extproc holds it. It is one pointer, so
// handing it over as an extproc.Lease allocates nothing.
type lease struct{ manager.Lease }

func (l lease) Release(extproc.Result) { l.Lease.Release() }

// TryLease leases a ready model when the request's Envoy knows where it
// runs: an atomic count and a few atomic loads.
func (ls leases) TryLease(node, model string) (extproc.Lease, bool) {
	l, ok := ls.mgr.TryLease(model)
	if !ok {
		return nil, false
	}
	if !ls.xds.Acked(node, model, l.Endpoint()) {
		l.Release()
		return nil, false
	}
	return lease{l}, true
}

// Lease loads the model if need be, then waits until the request's Envoy
// knows where it runs.
func (ls leases) Lease(ctx context.Context, node, model string) (extproc.Lease, error) {
	l, err := ls.mgr.Lease(ctx, model)
	switch {
	case errors.Is(err, manager.ErrUnknownModel):
		return nil, fmt.Errorf("%w: %w", extproc.ErrModelNotFound, err)
	case err != nil:
		return nil, err
	}
	// Where the lease found the model, while it still serves there.
	addr := func() string {
		if mv := ls.mgr.View().Model(model); mv != nil && !mv.Removed && mv.Endpoint == l.Endpoint() {
			return mv.Endpoint
		}
		return ""
	}
	if err := ls.xds.WaitAcked(ctx, node, model, addr); err != nil {
		l.Release()
		var na *xds.NotAckedError
		if errors.As(err, &na) {
			return nil, fmt.Errorf("%w: %w", extproc.ErrNotRoutable, err)
		}
		return nil, err
	}
	return lease{l}, nil
}

// modelState reads a model's state for the model list (vgw_state) from
// the manager's latest View.
func modelState(mgr *manager.Manager) func(model string) string {
	return func(model string) string {
		if mv := mgr.View().Model(model); mv != nil {
			return mv.State.String()
		}
		return manager.Stopped.String()
	}
}
