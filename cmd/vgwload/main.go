// Command vgwload drives an ext_proc server over loopback gRPC exactly as
// Envoy would (extproctest), and measures it next to a no-op ext_proc
// server run the same way: the floor that gRPC itself sets.
//
//	vgwload --vgw bin/vgw [--duration 3s --rounds 3 --concurrency 8,64 --sizes 1024,32768]
//	vgwload noop --addr 127.0.0.1:0 [--hold --http-addr 127.0.0.1:0]     (the floor server; vgwload starts it itself)
//	vgwload rss --vgw bin/vgw [--models 200 --waiting 10000]     (RSS of both, each holding the same waiting streams)
//
// Both servers run as child processes, so the CPU each one spends is read
// from /proc (utime + stime) around each measured run and divided by the
// requests it answered. Runs alternate vgw, floor, vgw, floor … so drift in
// the machine's speed hits both alike; each figure is the median over
// rounds, and the ratio is taken pair by pair.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/vgw-project/vgw/envoy"
	"github.com/vgw-project/vgw/extproc/extproctest"
)

func main() {
	log.SetFlags(0)
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "noop":
			if err := runNoop(os.Args[2:]); err != nil {
				log.Fatal(err)
			}
			return
		case "rss":
			if err := runRSS(os.Args[2:]); err != nil {
				log.Fatal(err)
			}
			return
		}
	}
	if err := drive(os.Args[1:]); err != nil {
		log.Fatal(err)
	}
}

type options struct {
	vgw         string
	envoyConfig string
	duration    time.Duration
	warmup      time.Duration
	rounds      int
	concurrency []int
	sizes       []int
}

func drive(args []string) error {
	fs := flag.NewFlagSet("vgwload", flag.ExitOnError)
	var o options
	var conc, sizes string
	fs.StringVar(&o.vgw, "vgw", "bin/vgw", "the vgw binary to measure")
	fs.StringVar(&o.envoyConfig, "envoy", "envoy/envoy.yaml", "the Envoy bootstrap whose ext_proc filter the load follows")
	fs.DurationVar(&o.duration, "duration", 3*time.Second, "length of each measured run")
	fs.DurationVar(&o.warmup, "warmup", time.Second, "unmeasured load before each run")
	fs.IntVar(&o.rounds, "rounds", 3, "measured runs of each server per setting")
	fs.StringVar(&conc, "concurrency", "8,64", "concurrent streams, comma-separated")
	fs.StringVar(&sizes, "sizes", "1024,32768", "request body sizes in bytes, comma-separated")
	fs.Parse(args)
	var err error
	if o.concurrency, err = ints(conc); err != nil {
		return err
	}
	if o.sizes, err = ints(sizes); err != nil {
		return err
	}

	b, err := envoy.Load(o.envoyConfig)
	if err != nil {
		return err
	}
	ep, err := envoy.ExtProc(b)
	if err != nil {
		return err
	}
	filter := extproctest.FilterFrom(ep)
	// The figures are CPU and throughput; a reply slowed past 200ms by a
	// saturated machine should count as slow, not fail the run.
	filter.MessageTimeout = time.Minute

	dir, err := os.MkdirTemp("", "vgwload")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	self, err := os.Executable()
	if err != nil {
		return err
	}
	servers := []*server{
		{name: "vgw", cmd: exec.Command(o.vgw, "serve", "--config", writeConfig(dir), "--extproc-addr", "127.0.0.1:0")},
		{name: "floor", cmd: exec.Command(self, "noop", "--addr", "127.0.0.1:0")},
	}
	for _, s := range servers {
		if err := s.start(); err != nil {
			return err
		}
		defer s.stop()
		if s.env, err = s.envoy(filter); err != nil {
			return err
		}
	}

	host, _ := os.Hostname()
	fmt.Printf("vgwload: %s, %d CPUs, %s; %d rounds of %v (after %v warm-up) per server and setting\n\n",
		host, numCPU(), cpuModel(), o.rounds, o.duration, o.warmup)
	fmt.Println("| conc | body | server | req/s | p50 | p99 | server CPU/req | CPU ratio to floor |")
	fmt.Println("|---:|---:|---|---:|---:|---:|---:|---:|")
	for _, c := range o.concurrency {
		for _, size := range o.sizes {
			body := chatBody(size)
			results := map[string][]runResult{}
			var ratios []float64
			for range o.rounds {
				var cpu [2]float64
				for i, s := range servers {
					s.load(c, body, o.warmup)
					r, err := s.measure(c, body, o.duration)
					if err != nil {
						return err
					}
					results[s.name] = append(results[s.name], r)
					cpu[i] = r.cpuPerReq
				}
				ratios = append(ratios, cpu[0]/cpu[1])
			}
			for i, s := range servers {
				rs := results[s.name]
				ratio := "1 (floor)"
				if i == 0 {
					ratio = fmt.Sprintf("%.2f× (%.2f–%.2f)", median(ratios), slices.Min(ratios), slices.Max(ratios))
				}
				fmt.Printf("| %d | %s | %s | %.0f | %s | %s | %.1f µs | %s |\n", c, sizeName(size), s.name,
					median(field(rs, func(r runResult) float64 { return r.rps })),
					dur(median(field(rs, func(r runResult) float64 { return r.p50 }))),
					dur(median(field(rs, func(r runResult) float64 { return r.p99 }))),
					median(field(rs, func(r runResult) float64 { return r.cpuPerReq })), ratio)
			}
		}
	}
	return nil
}

// server is a child process serving ext_proc.
type server struct {
	name string
	cmd  *exec.Cmd
	addr string
	http string // where it serves /metrics, if it does
	conn *grpc.ClientConn
	env  *extproctest.Envoy
}

// start runs the server and reads its listen addresses from its output:
// the "vgw serving" JSON log line of vgw, or the floor's "listening" line.
func (s *server) start() error {
	out, err := s.cmd.StderrPipe()
	if err != nil {
		return err
	}
	s.cmd.Stdout = s.cmd.Stderr
	if err := s.cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", s.name, err)
	}
	type addrs struct {
		ExtProc string `json:"extproc"`
		HTTP    string `json:"http"`
	}
	addr := make(chan addrs, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var line addrs
			if json.Unmarshal(sc.Bytes(), &line) == nil && line.ExtProc != "" {
				select {
				case addr <- line:
				default: // reported already; keep draining the output
				}
			}
		}
	}()
	select {
	case a := <-addr:
		s.addr, s.http = a.ExtProc, a.HTTP
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%s did not report its address", s.name)
	}
}

func (s *server) stop() {
	if s.conn != nil {
		s.conn.Close()
	}
	s.cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { s.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		s.cmd.Process.Kill()
	}
}

func (s *server) envoy(f extproctest.Filter) (*extproctest.Envoy, error) {
	var err error
	s.conn, err = grpc.NewClient(s.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	return extproctest.New(s.conn, f, answer), nil
}

// answer is the model server: a short completion, at once.
func answer(context.Context, *extproctest.Forwarded) (*extproctest.Response, error) {
	return &extproctest.Response{Status: 200, Headers: []extproctest.Header{{Key: "content-type", Value: "application/json"}},
		Body: []byte(`{"choices":[{"message":{"role":"assistant","content":"ok"}}]}`)}, nil
}

type runResult struct {
	rps, p50, p99, cpuPerReq float64 // p50, p99 in seconds; cpu in µs
}

// load runs c streams for d without measuring.
func (s *server) load(c int, body []byte, d time.Duration) {
	if d > 0 {
		s.run(c, body, d)
	}
}

func (s *server) measure(c int, body []byte, d time.Duration) (runResult, error) {
	before, err := cpuTime(s.cmd.Process.Pid)
	if err != nil {
		return runResult{}, err
	}
	start := time.Now()
	lat, errs := s.run(c, body, d)
	elapsed := time.Since(start)
	after, err := cpuTime(s.cmd.Process.Pid)
	if err != nil {
		return runResult{}, err
	}
	if errs > 0 {
		return runResult{}, fmt.Errorf("%s: %d requests failed", s.name, errs)
	}
	slices.Sort(lat)
	n := float64(len(lat))
	return runResult{
		rps:       n / elapsed.Seconds(),
		p50:       lat[len(lat)/2],
		p99:       lat[min(len(lat)-1, len(lat)*99/100)],
		cpuPerReq: (after - before).Seconds() * 1e6 / n,
	}, nil
}

// run keeps c requests in flight for d and returns their latencies.
func (s *server) run(c int, body []byte, d time.Duration) ([]float64, int) {
	deadline := time.Now().Add(d)
	var mu sync.Mutex
	var all []float64
	errs := 0
	var wg sync.WaitGroup
	for range c {
		wg.Go(func() {
			var lat []float64
			bad := 0
			req := extproctest.Request{Headers: []extproctest.Header{{Key: "content-type", Value: "application/json"}}, Body: body}
			for time.Now().Before(deadline) {
				t := time.Now()
				res, err := s.env.Do(context.Background(), req)
				if err != nil || res.Status != 200 {
					bad++
					continue
				}
				lat = append(lat, time.Since(t).Seconds())
			}
			mu.Lock()
			all = append(all, lat...)
			errs += bad
			mu.Unlock()
		})
	}
	wg.Wait()
	return all, errs
}

// cpuTime reads a process's user plus system CPU time from /proc.
func cpuTime(pid int) (time.Duration, error) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, fmt.Errorf("read CPU time: %w", err)
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	s := string(data)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(fields) < 13 {
		return 0, errors.New("short /proc stat")
	}
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	const clkTck = 100 // USER_HZ on Linux
	return time.Duration(utime+stime) * time.Second / clkTck, nil
}

// writeConfig writes the vgw config under test: one model, limits that
// never queue, logs at info.
func writeConfig(dir string) string {
	p := filepath.Join(dir, "vgw.yaml")
	os.WriteFile(p, []byte(`log_level: info
max_concurrent: 100000
max_queue: 100000
max_body_bytes: 8MiB
runtime: {kind: sim}
gpus: [{name: sim0, memory: 80GiB}]
models:
  llama-3.1-8b: {vram: 20GiB}
`), 0o600)
	return p
}

// chatBody is an OpenAI chat request of about size bytes, its model last
// so the whole body is read.
func chatBody(size int) []byte {
	var b strings.Builder
	b.WriteString(`{"messages":[{"role":"system","content":"You are a helpful assistant. Answer concisely."}`)
	turn := `,{"role":"user","content":"I run several language models on one GPU server and want to understand how memory is shared between them.\nHow do I tell how much a model really uses, and what happens when a new one does not fit?"}`
	for b.Len() < size-len(turn)-64 {
		b.WriteString(turn)
	}
	b.WriteString(`],"max_tokens":256,"stream":false,"model":"llama-3.1-8b"}`)
	return []byte(b.String())
}

func ints(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return nil, fmt.Errorf("%q is not a number", f)
		}
		out = append(out, n)
	}
	return out, nil
}

func field(rs []runResult, f func(runResult) float64) []float64 {
	out := make([]float64, len(rs))
	for i, r := range rs {
		out[i] = f(r)
	}
	return out
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

func dur(sec float64) string {
	return time.Duration(sec * float64(time.Second)).Round(time.Microsecond).String()
}

func sizeName(n int) string {
	if n >= 1024 && n%1024 == 0 {
		return strconv.Itoa(n/1024) + " KiB"
	}
	return strconv.Itoa(n) + " B"
}

func numCPU() int {
	data, _ := os.ReadFile("/proc/cpuinfo")
	return strings.Count(string(data), "processor\t:")
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}
