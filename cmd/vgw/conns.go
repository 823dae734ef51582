package main

import (
	"net"
	"syscall"

	"golang.org/x/net/netutil"
)

// Every connection vgw holds is a file descriptor, and the process has a
// fixed number of them (RLIMIT_NOFILE; Go raises the soft limit to the
// hard one at start). Unbounded, one port's idle connections can take
// them all, and then no listener accepts, no model server's listener can
// be opened and no file written. So each listener may hold a share of
// the descriptors, and the rest are kept for what vgw opens itself: the
// model servers' health checks and proxying sockets, the Docker API,
// NVML, the config and footprint files. A listener at its cap accepts the
// next connection once one of its own closes; until then the kernel
// queues it (its listen backlog), and the other listeners go on as
// before. Idle connections are closed by each server's timeouts (see
// startApp), so the caps are reached only by connections that are used.

// connCaps is how many connections each listener may hold at once.
type connCaps struct {
	ExtProc, XDS, Admin, HTTP int
}

// capsFor shares nofile descriptors among the listeners: a quarter (at
// least 256) is kept back for vgw's own; of the rest, half for ext_proc,
// which Envoy's workers each open several connections to, a quarter for
// HTTP (scrapers, health checks), an eighth each for xDS (one stream per
// Envoy) and the admin service.
func capsFor(nofile uint64) connCaps {
	const most = 1 << 20 // past this a cap means nothing; and it fits an int
	n := int(min(nofile, most))
	reserve := max(256, n/4)
	budget := max(n-reserve, 16)
	return connCaps{
		ExtProc: max(budget/2, 4),
		HTTP:    max(budget/4, 2),
		XDS:     max(budget/8, 2),
		Admin:   max(budget/8, 2),
	}
}

// openFilesLimit is the process's limit on open files.
func openFilesLimit() uint64 {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return 1024 // what Linux starts a process with
	}
	return r.Cur
}

// limitAll caps how many connections each listener holds open at once.
func limitAll(lis map[string]net.Listener, caps connCaps) {
	for name, n := range map[string]int{"xDS": caps.XDS, "ext_proc": caps.ExtProc, "admin": caps.Admin, "HTTP": caps.HTTP} {
		lis[name] = netutil.LimitListener(lis[name], n)
	}
}
