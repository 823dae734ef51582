package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/vgw-project/vgw/extproc/extproctest"
)

func TestCapsFor(t *testing.T) {
	for _, tc := range []struct {
		nofile uint64
		want   connCaps
	}{
		{1024, connCaps{ExtProc: 384, HTTP: 192, XDS: 96, Admin: 96}},
		{20000, connCaps{ExtProc: 7500, HTTP: 3750, XDS: 1875, Admin: 1875}},
		{256, connCaps{ExtProc: 8, HTTP: 4, XDS: 2, Admin: 2}},
		{1 << 62, connCaps{ExtProc: 393216, HTTP: 196608, XDS: 98304, Admin: 98304}},
	} {
		got := capsFor(tc.nofile)
		if got != tc.want {
			t.Errorf("capsFor(%d) = %+v, want %+v", tc.nofile, got, tc.want)
		}
		if sum := got.ExtProc + got.HTTP + got.XDS + got.Admin; tc.nofile > 512 && uint64(sum) > tc.nofile*3/4 {
			t.Errorf("capsFor(%d) hands out %d descriptors, over three quarters", tc.nofile, sum)
		}
	}
}

// TestConnectionFlood: a peer holding thousands of keep-alive connections
// to vgw's HTTP port cannot take the file descriptors the other listeners
// and the model servers need. vgw runs as its own process with 512
// descriptors; the flood opens 2,000 connections, each sending one
// GET /healthz and keeping the connection. Before each listener had a
// cap, vgw ran out of descriptors: ext_proc, xDS, admin and /healthz all
// stopped accepting (accept4: too many open files), and a model's server
// could not open its listener.
func TestConnectionFlood(t *testing.T) {
	_, logs, addr := serveProcess(t, serveConfig, "VGW_TEST_NOFILE=512")

	const flood = 2000
	var mu sync.Mutex
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	var wg sync.WaitGroup
	for range flood {
		wg.Go(func() {
			c, err := net.DialTimeout("tcp", addr("http"), 2*time.Second)
			if err != nil {
				return // the kernel's backlog is full: the flood is as big as it gets
			}
			c.Write([]byte("GET /healthz HTTP/1.1\r\nHost: vgw\r\n\r\n"))
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		})
	}
	wg.Wait()
	t.Logf("%d flood connections open", len(conns))

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, port := range []string{"extproc", "xds", "admin"} {
		conn, err := grpc.NewClient(addr(port), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		hc, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		if err != nil || hc.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("%s health under the flood: %v %v", port, hc, err)
		}
	}

	// A model loads (its fake server opens a listener) and is routed.
	conn, err := grpc.NewClient(addr("extproc"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	res, err := clusterEcho(t, conn).Do(ctx, extproctest.Request{Body: []byte(`{"model":"llama"}`)})
	if err != nil || res.Status != 200 || string(res.Body) != "model/llama" {
		t.Fatalf("a request under the flood: %+v %v\n%s", res, err, logs.String())
	}
	for _, l := range logs.lines() {
		if l["level"] == "ERROR" {
			t.Errorf("vgw logged an error under the flood: %v", l)
		}
	}
}

// TestBodyMemoryBound: bodies over max_body_bytes cost vgw no more than
// their refusal. vgw (its own process, max_body_bytes 1 MiB) is sent 16
// ext_proc body messages of 60 MB at once, as an Envoy whose buffer limit
// is far above vgw's would; gRPC refuses each on its length prefix. The
// listener took any message up to 65 MiB whatever max_body_bytes said:
// 16 such bodies took vgw's memory to 3 GB.
func TestBodyMemoryBound(t *testing.T) {
	pid, _, addr := serveProcess(t, "max_body_bytes: 1MiB\n"+serveConfig)
	before := peakRSS(t, pid)

	conn, err := grpc.NewClient(addr("extproc"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	const bodies, size = 16, 60 << 20
	body := bytes.Repeat([]byte("x"), size)
	headers := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
		Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: ":method", RawValue: []byte("POST")}}}}}}
	var wg sync.WaitGroup
	errs := make(chan error, bodies)
	for range bodies {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			stream, err := extprocv3.NewExternalProcessorClient(conn).Process(ctx)
			if err == nil {
				err = stream.Send(headers)
			}
			if err == nil {
				_, err = stream.Recv()
			}
			if err != nil {
				errs <- fmt.Errorf("headers: %w", err)
				return
			}
			stream.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: body, EndOfStream: true}}})
			_, err = stream.Recv()
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if status.Code(err) != codes.ResourceExhausted {
			t.Errorf("a 60 MB body: %v, want ResourceExhausted", err)
		}
	}
	grew := peakRSS(t, pid) - before
	t.Logf("peak RSS grew by %d MiB for %d bodies of %d MiB", grew>>20, bodies, size>>20)
	if grew > bodies*size/4 {
		t.Errorf("vgw's peak RSS grew by %d MiB for %d refused bodies of %d MiB", grew>>20, bodies, size>>20)
	}
}

// serveProcess runs `vgw serve` on config as a process of its own (the
// test binary is vgw: see TestMain), with env added to its environment,
// on loopback ports, until the test ends. It returns the process's pid,
// its log and its listeners' addresses by name (extproc, xds, admin, http).
func serveProcess(t *testing.T, config string, env ...string) (pid int, logs *lockedBuffer, addr func(string) string) {
	t.Helper()
	cfgPath := filepath.Join(t.TempDir(), "vgw.yaml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	logs = &lockedBuffer{}
	vgw := exec.Command(os.Args[0], "serve", "--config", cfgPath,
		"--extproc-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0")
	vgw.Env = append(os.Environ(), env...)
	vgw.Stderr = logs
	if err := vgw.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		vgw.Process.Signal(syscall.SIGTERM)
		vgw.Wait()
	})
	serving := logs.waitFor(t, "vgw serving")
	return vgw.Process.Pid, logs, func(k string) string { s, _ := serving[k].(string); return s }
}

// peakRSS is a process's peak resident set (VmHWM), in bytes.
func peakRSS(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM")
	return 0
}
