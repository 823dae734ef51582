package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/vgw-project/vgw/admin/admintest"
	"github.com/vgw-project/vgw/extproc"
)

// runRSS measures vgw's resident memory with many models configured and
// many requests waiting, next to the floor that gRPC itself sets. It
// starts vgw serve with a config of --models models whose fake servers
// never become ready, opens --waiting ext_proc streams as Envoy would,
// waits until vgw has told each one it is queued (its
// override_message_timeout), and reads vgw's VmRSS from /proc. Then it does
// the same, with the same client, to the no-op server in its hold mode,
// which answers the same messages the same way and holds each stream with
// nothing of its own, and prints both and their ratio. Both serve /metrics,
// so the Go runtime's own accounts (stacks, heap) say where a difference
// goes.
func runRSS(args []string) error {
	fs := flag.NewFlagSet("vgwload rss", flag.ExitOnError)
	vgw := fs.String("vgw", "bin/vgw", "the vgw binary")
	models := fs.Int("models", 200, "configured models")
	waiting := fs.Int("waiting", 10000, "requests left waiting")
	spread := fs.Int("spread", 10, "how many models the waiting requests ask for")
	fs.Parse(args)
	if *models < 1 || *waiting < 1 || *spread < 1 || *spread > *models {
		return errors.New("want --models, --waiting and --spread at least 1, and --spread at most --models")
	}

	dir, err := os.MkdirTemp("", "vgwload-rss")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	cfg, err := writeRSSConfig(dir, *models, *waiting)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	host, _ := os.Hostname()
	fmt.Printf("vgwload rss: %s, %d CPUs, %s; load average %s; %d models configured, %d requests waiting on %d of them\n\n",
		host, numCPU(), cpuModel(), loadAverage(), *models, *waiting, *spread)

	// Every listener on a free port: another vgw on this host must not
	// stop the measurement, nor be disturbed by it.
	free := "127.0.0.1:0"
	servers := []*server{
		{name: "vgw", cmd: exec.Command(*vgw, "serve", "--config", cfg,
			"--extproc-addr", free, "--xds-addr", free, "--admin-addr", free, "--http-addr", free)},
		{name: "floor", cmd: exec.Command(self, "noop", "--hold", "--addr", free, "--http-addr", free)},
	}
	var results []memResult
	for _, s := range servers {
		r, err := holdStreams(s, *waiting, *spread)
		if err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
		results = append(results, r)
	}
	printRSS(servers, results, *waiting)
	return nil
}

// writeRSSConfig writes the config of vgw under measurement: models that
// each fit alone and never turn healthy, so a request for one waits, and
// a queue long enough for every request.
func writeRSSConfig(dir string, models, waiting int) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "log_level: info\nmax_concurrent: 50\nmax_queue: %d\nqueue_timeout: 10m\nload_timeout: 10m\n", waiting)
	b.WriteString("runtime: {kind: sim}\ngpus: [{name: sim0, memory: 80GiB}, {name: sim1, memory: 80GiB}]\nmodels:\n")
	for i := range models {
		fmt.Fprintf(&b, "  model-%03d: {repo: org/model-%03d, vram: 70GiB, sim: {startup_delay: 1h}}\n", i, i)
	}
	p := filepath.Join(dir, "vgw.yaml")
	if err := os.WriteFile(p, []byte(b.String()), 0o600); err != nil {
		return "", fmt.Errorf("write config: %w", err)
	}
	return p, nil
}

// memResult is one server's memory, idle and with the streams held.
type memResult struct {
	idle, held memSnapshot
	opened     time.Duration // until every stream was told to wait
}

// memSnapshot is a process's memory at one moment: /proc's view and the Go
// runtime's (its /metrics).
type memSnapshot struct {
	rss, anon, file int64 // VmRSS, RssAnon, RssFile (the mapped binary and libraries), bytes
	metrics         admintest.Samples
}

// openTimeout bounds how long the streams may take to be told to wait: a
// server that never answers some of them fails the run instead of hanging it.
const openTimeout = 3 * time.Minute

// holdStreams starts s, reads its idle RSS, opens waiting streams to it
// that ask for spread models in turn, and once every one is told to wait
// reads its RSS and its /metrics; then it closes the streams and stops s.
func holdStreams(s *server, waiting, spread int) (memResult, error) {
	var r memResult
	if err := s.start(); err != nil {
		return r, err
	}
	defer s.stop()
	var err error
	if r.idle, err = snapshot(s); err != nil {
		return r, fmt.Errorf("idle: %w", err)
	}

	clients, closeAll, err := dial(s.addr, waiting)
	if err != nil {
		return r, err
	}
	defer closeAll()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel() // closes every stream, before the wait above
	var queued, failed atomic.Int64
	var firstErr atomic.Pointer[error]
	start := time.Now()
	for i := range waiting {
		wg.Go(func() {
			client := clients[i/extproc.MaxStreamsPerConnection]
			if err := wait(ctx, client, fmt.Sprintf("model-%03d", i%spread)); err != nil {
				firstErr.CompareAndSwap(nil, &err)
				failed.Add(1)
				return
			}
			queued.Add(1)
		})
	}
	for queued.Load()+failed.Load() < int64(waiting) {
		if time.Since(start) > openTimeout {
			return r, fmt.Errorf("only %d of %d requests told to wait after %v", queued.Load(), waiting, openTimeout)
		}
		time.Sleep(50 * time.Millisecond) // polling interval
	}
	r.opened = time.Since(start)
	if f := failed.Load(); f > 0 {
		return r, fmt.Errorf("%d of %d requests were not told to wait, the first: %w", f, waiting, *firstErr.Load())
	}
	time.Sleep(time.Second) // let the heap settle after the burst
	if r.held, err = snapshot(s); err != nil {
		return r, fmt.Errorf("held: %w", err)
	}
	return r, nil
}

// dial opens as many connections to addr as streams need, as Envoy's
// HTTP/2 pool does: one connection carries at most the streams the server
// advertises (extproc.MaxStreamsPerConnection, which both servers use), and
// a stream past that would wait for one of them to end.
func dial(addr string, streams int) ([]extprocv3.ExternalProcessorClient, func(), error) {
	per := extproc.MaxStreamsPerConnection
	var conns []*grpc.ClientConn
	closeAll := func() {
		for _, c := range conns {
			c.Close()
		}
	}
	var clients []extprocv3.ExternalProcessorClient
	for range (streams + per - 1) / per {
		c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			closeAll()
			return nil, nil, fmt.Errorf("dial: %w", err)
		}
		conns = append(conns, c)
		clients = append(clients, extprocv3.NewExternalProcessorClient(c))
	}
	return clients, closeAll, nil
}

// snapshot reads s's RSS first, so that the scrape's own allocations are
// not in it, then its /metrics.
func snapshot(s *server) (memSnapshot, error) {
	var m memSnapshot
	st, err := procStatus(s.cmd.Process.Pid)
	if err != nil {
		return m, err
	}
	m.rss, m.anon, m.file = st["VmRSS"], st["RssAnon"], st["RssFile"]
	if s.http == "" {
		return m, errors.New("no /metrics address reported")
	}
	m.metrics, err = admintest.Scrape("http://" + s.http + "/metrics")
	return m, err
}

// printRSS prints both servers' RSS, idle and held, and the ratio of the
// first's to the second's (the floor's); then, account by account, where
// each one's memory is, so that a difference can be traced: /proc's
// file-backed and anonymous RSS, and the Go runtime's own accounts from
// /metrics.
func printRSS(servers []*server, rs []memResult, waiting int) {
	v, f := rs[0], rs[1]
	fmt.Printf("| server | idle RSS | RSS, %d waiting | told to wait in |\n", waiting)
	fmt.Println("|---|---:|---:|---:|")
	for i, r := range rs {
		fmt.Printf("| %s | %s | **%s** | %v |\n", servers[i].name, mib(r.idle.rss), mib(r.held.rss), r.opened.Round(time.Millisecond))
	}
	vAdded, fAdded := v.held.rss-v.idle.rss, f.held.rss-f.idle.rss
	fmt.Printf("\n%s / %s: **%.2f×** the RSS with the streams held; %.2f× what the streams added (held − idle: %s vs %s)\n\n",
		servers[0].name, servers[1].name, float64(v.held.rss)/float64(f.held.rss), float64(vAdded)/float64(fAdded), mib(vAdded), mib(fAdded))

	a, b := servers[0].name, servers[1].name
	fmt.Printf("| account | %s idle | %s idle | %s, %d waiting | %s, %d waiting | difference, waiting |\n", a, b, a, waiting, b, waiting)
	fmt.Println("|---|---:|---:|---:|---:|---:|")
	for _, acc := range memAccounts {
		vi, fi, vh, fh := acc.get(v.idle), acc.get(f.idle), acc.get(v.held), acc.get(f.held)
		fmt.Printf("| %s | %s | %s | %s | %s | %s |\n", acc.name, acc.format(vi), acc.format(fi), acc.format(vh), acc.format(fh), acc.format(vh-fh))
	}
}

// memAccount is one line of where a process's memory is.
type memAccount struct {
	name   string
	get    func(memSnapshot) int64
	format func(int64) string
}

// memAccounts are the lines printRSS breaks the memory down by. The Go
// runtime's are its MemStats as /metrics serves them (go_memstats_*).
var memAccounts = []memAccount{
	{"RSS", func(m memSnapshot) int64 { return m.rss }, mib},
	{"RSS, file-backed (the binary's pages)", func(m memSnapshot) int64 { return m.file }, mib},
	{"RSS, anonymous", func(m memSnapshot) int64 { return m.anon }, mib},
	{"Go: goroutine stacks in use", stat("go_memstats_stack_inuse_bytes"), mib},
	{"Go: heap spans in use", stat("go_memstats_heap_inuse_bytes"), mib},
	{"Go: of which allocated objects (live or not yet swept)", stat("go_memstats_alloc_bytes"), mib},
	{"Go: heap goal (the next GC's trigger)", stat("go_memstats_next_gc_bytes"), mib},
	{"Go: heap free, not yet returned to the OS", func(m memSnapshot) int64 {
		return int64(m.metrics["go_memstats_heap_idle_bytes"] - m.metrics["go_memstats_heap_released_bytes"])
	}, mib},
	{"Go: runtime metadata (spans, GC, profiling, other)", func(m memSnapshot) int64 {
		s := m.metrics
		return int64(s["go_memstats_mspan_inuse_bytes"] + s["go_memstats_mcache_inuse_bytes"] + s["go_memstats_gc_sys_bytes"] +
			s["go_memstats_buck_hash_sys_bytes"] + s["go_memstats_other_sys_bytes"])
	}, mib},
	{"goroutines", stat("go_goroutines"), func(n int64) string { return strconv.FormatInt(n, 10) }},
}

// stat reads one series of a snapshot's /metrics.
func stat(name string) func(memSnapshot) int64 {
	return func(m memSnapshot) int64 { return int64(m.metrics[name]) }
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// wait sends one request's headers and body as Envoy does and returns
// once the server answers that it is holding the request (a timeout
// override), keeping the stream open until ctx ends.
func wait(ctx context.Context, client extprocv3.ExternalProcessorClient, model string) error {
	st, err := client.Process(ctx)
	if err != nil {
		return err
	}
	body := []byte(`{"model":"` + model + `","messages":[{"role":"user","content":"hello"}]}`)
	if err := st.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
		Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: ":method", RawValue: []byte("POST")}, {Key: "content-length", RawValue: []byte(strconv.Itoa(len(body)))}}},
	}}}); err != nil {
		return err
	}
	if _, err := st.Recv(); err != nil {
		return err
	}
	if err := st.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: body, EndOfStream: true}}}); err != nil {
		return err
	}
	r, err := st.Recv()
	if err != nil {
		return err
	}
	if r.GetOverrideMessageTimeout() == nil {
		return fmt.Errorf("got %v, want the request held", r)
	}
	return nil
}

// procStatus reads the memory lines of /proc/PID/status (those in kB), in
// bytes.
func procStatus(pid int) (map[string]int64, error) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return nil, fmt.Errorf("read memory of pid %d: %w", pid, err)
	}
	out := map[string]int64{}
	for _, line := range strings.Split(string(data), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if kb, isKB := strings.CutSuffix(strings.TrimSpace(v), " kB"); ok && isKB {
			n, err := strconv.ParseInt(kb, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("pid %d: %s: %w", pid, k, err)
			}
			out[k] = n << 10
		}
	}
	if _, ok := out["VmRSS"]; !ok {
		return nil, fmt.Errorf("no VmRSS for pid %d", pid)
	}
	return out, nil
}

// loadAverage is the first three fields of /proc/loadavg: how busy the
// machine was, which the figures are read against.
func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(data))
	return strings.Join(f[:min(3, len(f))], " ")
}
