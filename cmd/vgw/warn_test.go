package main

import (
	"net"
	"slices"
	"strings"
	"testing"
)

// boundAddr is addr as serve sees it: the address its listener is bound
// to. A name ("localhost") is bound for real, as vgw binds it; an IP
// needs no listener.
func boundAddr(t *testing.T, addr string) net.Addr {
	t.Helper()
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	if net.ParseIP(host) == nil {
		lis, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		lis.Close()
		return lis.Addr()
	}
	a, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// warningKind names a warning by what it is about, so that the table
// does not repeat the messages.
func warningKind(w exposureWarning) string {
	switch {
	case w.addr.Key == "admin" && strings.Contains(w.msg, "no token"):
		return "admin open"
	case w.addr.Key == "admin" && strings.Contains(w.msg, "clear text"):
		return "admin token in clear"
	case w.addr.Key == "http" && strings.Contains(w.msg, "clear text"):
		return "http token in clear"
	}
	return "unknown: " + w.addr.String() + " " + w.msg
}

// TestExposureWarnings: serve warns when the admin service is reachable
// from the network with no token, or when the token would cross it in
// clear text; never for loopback, however it is spelt.
func TestExposureWarnings(t *testing.T) {
	const local = "127.0.0.1:9091"
	tests := []struct {
		name        string
		admin, http string
		token, tls  bool
		want        []string
	}{
		{name: "loopback, no token", admin: "127.0.0.1:9090", http: local},
		{name: "another loopback address", admin: "127.0.0.2:9090", http: local},
		{name: "IPv6 loopback", admin: "[::1]:9090", http: local},
		{name: "localhost", admin: "localhost:0", http: "localhost:0"},
		{name: "IPv4-mapped loopback", admin: "[::ffff:127.0.0.1]:9090", http: local},
		{name: "loopback, token, no TLS", admin: "127.0.0.1:9090", http: local, token: true},
		{name: "all interfaces, no token", admin: "0.0.0.0:9090", http: local, want: []string{"admin open"}},
		{name: "all IPv6 interfaces, no token", admin: "[::]:9090", http: local, want: []string{"admin open"}},
		{name: "a network address, no token", admin: "192.0.2.10:9090", http: local, want: []string{"admin open"}},
		{name: "no token, TLS", admin: "0.0.0.0:9090", http: local, tls: true, want: []string{"admin open"}},
		{name: "token, no TLS", admin: "0.0.0.0:9090", http: local, token: true, want: []string{"admin token in clear"}},
		{name: "token and TLS", admin: "0.0.0.0:9090", http: local, token: true, tls: true},
		{name: "HTTP beyond loopback, token", admin: "127.0.0.1:9090", http: "0.0.0.0:9091", token: true, tls: true, want: []string{"http token in clear"}},
		{name: "HTTP beyond loopback, no token to leak", admin: "127.0.0.1:9090", http: "0.0.0.0:9091"},
		{name: "both beyond loopback, token, no TLS", admin: "0.0.0.0:9090", http: "0.0.0.0:9091", token: true, want: []string{"admin token in clear", "http token in clear"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			admin, http := boundAddr(t, tt.admin), boundAddr(t, tt.http)
			var got []string
			for _, w := range exposureWarnings(admin, http, tt.token, tt.tls) {
				got = append(got, warningKind(w))
				if want := map[string]net.Addr{"admin": admin, "http": http}[w.addr.Key]; want == nil || w.addr.Value.String() != want.String() {
					t.Errorf("%q names %v, want the listener's address", w.msg, w.addr)
				}
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("warnings %q, want %q", got, tt.want)
			}
		})
	}
}
