package main

import (
	"context"
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
)

// runRSS measures vgw's resident memory with many models configured and
// many requests waiting: it starts vgw serve with a config of --models
// models whose fake servers never become ready, opens --waiting ext_proc
// streams as Envoy would, waits until vgw has told each one it is queued
// (its override_message_timeout), and reads vgw's VmRSS from /proc.
func runRSS(args []string) error {
	fs := flag.NewFlagSet("vgwload rss", flag.ExitOnError)
	vgw := fs.String("vgw", "bin/vgw", "the vgw binary")
	models := fs.Int("models", 200, "configured models")
	waiting := fs.Int("waiting", 10000, "requests left waiting")
	spread := fs.Int("spread", 10, "how many models the waiting requests ask for")
	fs.Parse(args)

	dir, err := os.MkdirTemp("", "vgwload-rss")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	cfg := filepath.Join(dir, "vgw.yaml")
	var b strings.Builder
	fmt.Fprintf(&b, "log_level: info\nmax_concurrent: 50\nmax_queue: %d\nqueue_timeout: 10m\nload_timeout: 10m\n", *waiting)
	b.WriteString("runtime: {kind: sim}\ngpus: [{name: sim0, memory: 80GiB}, {name: sim1, memory: 80GiB}]\nmodels:\n")
	for i := range *models {
		// Each fits alone; the ones asked for load but never turn healthy.
		fmt.Fprintf(&b, "  model-%03d: {repo: org/model-%03d, vram: 70GiB, sim: {startup_delay: 1h}}\n", i, i)
	}
	os.WriteFile(cfg, []byte(b.String()), 0o600)

	s := &server{name: "vgw", cmd: exec.Command(*vgw, "serve", "--config", cfg, "--extproc-addr", "127.0.0.1:0")}
	if err := s.start(); err != nil {
		return err
	}
	defer s.stop()
	idle, err := rss(s.cmd.Process.Pid)
	if err != nil {
		return err
	}

	conn, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	client := extprocv3.NewExternalProcessorClient(conn)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var queued, failed atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for i := range *waiting {
		wg.Go(func() {
			model := fmt.Sprintf("model-%03d", i%*spread)
			if err := wait(ctx, client, model); err != nil {
				failed.Add(1)
				return
			}
			queued.Add(1)
		})
	}
	for queued.Load()+failed.Load() < int64(*waiting) {
		time.Sleep(50 * time.Millisecond) // polling interval
	}
	if f := failed.Load(); f > 0 {
		return fmt.Errorf("%d of %d requests were not queued", f, *waiting)
	}
	time.Sleep(time.Second) // let the heap settle after the burst
	held, err := rss(s.cmd.Process.Pid)
	if err != nil {
		return err
	}
	fmt.Printf("vgw RSS: %.1f MiB idle with %d models configured; %.1f MiB with %d requests waiting on %d loading models (queued in %v)\n",
		float64(idle)/(1<<20), *models, float64(held)/(1<<20), *waiting, *spread, time.Since(start).Round(time.Millisecond))
	cancel()
	wg.Wait()
	return nil
}

// wait sends one request's headers and body as Envoy does and returns
// once vgw answers that it is holding the request (a timeout override),
// keeping the stream open until ctx ends.
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

// rss reads a process's resident set size from /proc.
func rss(pid int) (int64, error) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmRSS for pid %d", pid)
}
