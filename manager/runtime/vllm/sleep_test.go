package vllm

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/vgw-project/vgw/internal/fakevllm"
	"github.com/vgw-project/vgw/internal/poll"
)

// fake serves a ready fake vLLM in sleep mode (or not) and returns its
// address.
func fake(t *testing.T, sleepMode bool) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := fakevllm.New(fakevllm.Options{Model: "m", SleepMode: sleepMode, DevMode: true})
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, lis) }()
	t.Cleanup(func() { cancel(); <-done })
	poll.Until(t, "the fake to be ready", s.Ready)
	return lis.Addr().String()
}

// completes reports what a completion from the server at addr gets: its
// status, and whether its text is sense (not level-2 nonsense).
func completes(t *testing.T, addr string) (int, bool) {
	t.Helper()
	resp, err := http.Post("http://"+addr+"/v1/completions", "application/json", strings.NewReader(`{"model":"m","prompt":"x","max_tokens":2}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, !strings.Contains(string(b), "#####")
}

// TestSleepWake: each level sleeps and wakes through vLLM's sequence, and
// a woken server serves sense; asleep, it serves nothing.
func TestSleepWake(t *testing.T) {
	ctx := context.Background()
	c := http.DefaultClient
	for _, level := range []int{1, 2, 1} {
		addr := fake(t, true)
		if err := Sleep(ctx, c, addr, level); err != nil {
			t.Fatalf("level %d: %v", level, err)
		}
		if asleep, err := IsSleeping(ctx, c, addr); err != nil || !asleep {
			t.Fatalf("level %d: is_sleeping %v %v", level, asleep, err)
		}
		if code, _ := completes(t, addr); code != http.StatusServiceUnavailable {
			t.Errorf("level %d: asleep, a completion got %d", level, code)
		}
		if err := Wake(ctx, c, addr, level); err != nil {
			t.Fatalf("level %d: wake: %v", level, err)
		}
		if code, sense := completes(t, addr); code != http.StatusOK || !sense {
			t.Errorf("level %d: woken, a completion got %d, sense %v", level, code, sense)
		}
		if err := WarmUp(ctx, c, addr, "m", ""); err != nil {
			t.Errorf("level %d: warm up: %v", level, err)
		}
	}
}

// TestSleepErrors: a server without sleep mode, a wrong level and a dead
// server each give an error that says what failed.
func TestSleepErrors(t *testing.T) {
	ctx := context.Background()
	c := http.DefaultClient
	if err := Sleep(ctx, c, fake(t, false), 1); err == nil || !strings.Contains(err.Error(), "Sleep mode is not enabled") {
		t.Errorf("no sleep mode: %v", err)
	}
	if err := Sleep(ctx, c, fake(t, true), 3); err == nil || !strings.Contains(err.Error(), "level 3") {
		t.Errorf("level 3: %v", err)
	}
	if err := Wake(ctx, c, fake(t, true), 0); err == nil {
		t.Error("wake at level 0: no error")
	}
	dead := httptest.NewServer(http.NotFoundHandler())
	addr := strings.TrimPrefix(dead.URL, "http://")
	dead.Close()
	if err := Wake(ctx, c, addr, 1); err == nil || !strings.Contains(err.Error(), "/wake_up") {
		t.Errorf("dead server: %v", err)
	}
	if _, err := IsSleeping(ctx, c, addr); err == nil {
		t.Error("dead server: is_sleeping says nothing wrong")
	}
}
