// Package managertest has what the tests of the manager and of its
// runtimes share: a config from YAML, a model server asked as Envoy would
// ask it, a log handler that keeps what it is given, and a directory that
// refuses writes.
package managertest

import (
	"context"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vgw-project/vgw/config"
)

// Config parses yaml as a vgw config file, failing t if it is not one.
func Config(t testing.TB, yaml string) *config.Config {
	t.Helper()
	cfg, err := config.Parse("test.yaml", []byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// Chat sends a one-token chat request for model to the server at addr,
// as Envoy would, and returns its status; 0 when it could not be sent.
func Chat(addr, model string) int {
	resp, err := http.Post("http://"+addr+"/v1/chat/completions", "application/json",
		strings.NewReader(`{"model":"`+model+`","max_tokens":1}`))
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// Answers reports whether a server at addr answers GET /health, whatever
// it says, within 5 s (then ask again).
func Answers(addr string) bool {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + "/health")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return true
}

// LogRecorder is a slog handler that keeps every record, for tests that
// check what was logged.
type LogRecorder struct {
	mu      sync.Mutex
	records []slog.Record
}

func (l *LogRecorder) Enabled(context.Context, slog.Level) bool { return true }

func (l *LogRecorder) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	l.records = append(l.records, r.Clone())
	l.mu.Unlock()
	return nil
}

// WithAttrs and WithGroup keep nothing: the manager and the runtimes add
// no attributes or groups to their loggers.
func (l *LogRecorder) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *LogRecorder) WithGroup(string) slog.Handler      { return l }

// Records returns what was logged so far.
func (l *LogRecorder) Records() []slog.Record {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.records)
}

// Attr is the value of a record's attribute key, or nil.
func Attr(r slog.Record, key string) any {
	var v any
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == key {
			v = a.Value.Any()
			return false
		}
		return true
	})
	return v
}

// ReadOnly makes dir refuse new files, even to root (chattr +i), until the
// test ends; it skips the test where it cannot.
func ReadOnly(t *testing.T, dir string) {
	t.Helper()
	if os.Geteuid() != 0 {
		os.Chmod(dir, 0o500)
		t.Cleanup(func() { os.Chmod(dir, 0o700) })
		return
	}
	if out, err := exec.Command("chattr", "+i", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot make %s read-only as root (chattr: %v %s)", dir, err, out)
	}
	t.Cleanup(func() { exec.Command("chattr", "-i", dir).Run() })
}
