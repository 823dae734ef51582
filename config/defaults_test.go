package config

import (
	"net"
	"reflect"
	"testing"
)

// listenAddrs returns every listener address of l by field name. It walks
// the struct, so a listener added later is covered by the tests below
// without a change to them.
func listenAddrs(t *testing.T, l Listen) map[string]string {
	t.Helper()
	v := reflect.ValueOf(l)
	out := map[string]string{}
	for i := range v.NumField() {
		f := v.Type().Field(i)
		if f.Type.Kind() != reflect.String {
			t.Fatalf("Listen.%s is a %s, not an address", f.Name, f.Type)
		}
		out[f.Name] = v.Field(i).String()
	}
	return out
}

// wantLoopback fails unless every address of l is on 127.0.0.1.
func wantLoopback(t *testing.T, l Listen) {
	t.Helper()
	for name, addr := range listenAddrs(t, l) {
		host, _, err := net.SplitHostPort(addr)
		if err != nil || host != "127.0.0.1" {
			t.Errorf("Listen.%s = %q: want 127.0.0.1, so nothing is reachable from the network until an operator says so", name, addr)
		}
	}
}

// TestDefaultsLoopback: every listener defaults to loopback, both in
// Defaults and in a parsed config that names no listen settings. The
// admin service can load, unload and drain models, and its token is
// optional, so a default that listened on every interface would open it.
func TestDefaultsLoopback(t *testing.T) {
	if got := len(listenAddrs(t, Defaults.Listen)); got != 4 {
		t.Errorf("%d listeners; the test names extproc, xds, admin and http", got)
	}
	wantLoopback(t, Defaults.Listen)
	c, err := Parse("min.yaml", []byte("runtime: {kind: sim}\ngpus: [{name: g, memory: 1GiB}]\nmodels:\n  m: {}\n"))
	if err != nil {
		t.Fatal(err)
	}
	wantLoopback(t, c.Listen)
	c.ApplyEnv(func(string) string { return "" })
	wantLoopback(t, c.Listen)
}

// TestApplyEnvEachListener: each VGW_*_ADDR moves its own listener, and
// only that one, off loopback, over the file's setting as well as over
// the default.
func TestApplyEnvEachListener(t *testing.T) {
	tests := []struct {
		env   string
		field string
	}{
		{"VGW_EXTPROC_ADDR", "ExtProc"},
		{"VGW_XDS_ADDR", "XDS"},
		{"VGW_ADMIN_ADDR", "Admin"},
		{"VGW_HTTP_ADDR", "HTTP"},
	}
	fromFile := Listen{ExtProc: "127.0.0.1:19002", XDS: "127.0.0.1:28000", Admin: "127.0.0.1:19090", HTTP: "127.0.0.1:19091"}
	for _, tt := range tests {
		for _, base := range []Listen{Defaults.Listen, fromFile} {
			c := Config{Listen: base}
			const addr = "0.0.0.0:7000"
			c.ApplyEnv(func(k string) string {
				if k == tt.env {
					return addr
				}
				return ""
			})
			got, was := listenAddrs(t, c.Listen), listenAddrs(t, base)
			for name := range was {
				want := was[name]
				if name == tt.field {
					want = addr
				}
				if got[name] != want {
					t.Errorf("%s over %+v: Listen.%s = %q, want %q", tt.env, base, name, got[name], want)
				}
			}
		}
	}
	if len(tests) != len(listenAddrs(t, Defaults.Listen)) {
		t.Errorf("%d environment variables for %d listeners", len(tests), len(listenAddrs(t, Defaults.Listen)))
	}
}
