package envoy

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
)

// TestShippedConfigs checks every bootstrap in this directory: each must
// load and pass with no errors and no warnings.
func TestShippedConfigs(t *testing.T) {
	files, err := filepath.Glob("*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no Envoy configs found")
	}
	for _, f := range files {
		t.Run(f, func(t *testing.T) {
			b, err := Load(f)
			if err != nil {
				t.Fatal(err)
			}
			if ps := Check(b); len(ps) > 0 {
				t.Fatalf("%s has problems: %v", f, ps)
			}
		})
	}
}

// TestBrokenConfigs breaks envoy.yaml one way at a time; each copy must be
// refused, with a message that names the problem.
func TestBrokenConfigs(t *testing.T) {
	orig, err := os.ReadFile("envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name      string
		old, new  string
		wantParse string // the parse must fail with this
		wantCheck string // or the check must report this
		warning   bool   // the check's report is a warning only
		// noMaxMessage also drops max_message_timeout.
		noMaxMessage bool
		all          bool // replace every occurrence of old
	}{
		{name: "unknown field", old: "codec_type: AUTO", new: "codec_typo: AUTO", wantParse: "codec_typo"},
		{name: "bad enum", old: "request_body_mode: BUFFERED", new: "request_body_mode: BUFFERD", wantParse: "BUFFERD"},
		{name: "unknown typed_config", old: "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router", new: "type.googleapis.com/envoy.extensions.filters.http.nope.v3.Nope", wantParse: "nope"},
		{name: "PGV rule in typed_config", old: "stat_prefix: openai", new: `stat_prefix: ""`, wantCheck: "StatPrefix"},
		{name: "PGV rule at top level", old: "connect_timeout: 1s", new: "connect_timeout: -1s", wantCheck: "ConnectTimeout"},
		{name: "missing ext_proc cluster", old: "envoy_grpc: { cluster_name: vgw_extproc }", new: "envoy_grpc: { cluster_name: nowhere }", wantCheck: `cluster "nowhere" is not defined`},
		{name: "ext_proc cluster without HTTP/2", old: "          http2_protocol_options: {}\n", new: "          http_protocol_options: {}\n", wantCheck: "must speak HTTP/2"},
		{name: "router not last", old: "          - name: envoy.filters.http.ext_proc\n", new: "          - name: envoy.filters.http.router\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n          - name: envoy.filters.http.ext_proc\n", wantCheck: "router filter must be the last"},
		{name: "fail open", old: "failure_mode_allow: false", new: "failure_mode_allow: true", wantCheck: "fail-open"},
		{name: "route cache retained", old: "failure_mode_allow: false", new: "failure_mode_allow: false\n              route_cache_action: RETAIN", wantCheck: "must clear the route cache"},
		{name: "route cache clearing disabled", old: "failure_mode_allow: false", new: "failure_mode_allow: false\n              disable_clear_route_cache: true", wantCheck: "must clear the route cache"},
		{name: "immediate responses disabled", old: "failure_mode_allow: false", new: "failure_mode_allow: false\n              disable_immediate_response: true", wantCheck: "immediate response"},
		{name: "mutation rules", old: "failure_mode_allow: false", new: "failure_mode_allow: false\n              mutation_rules: { disallow_all: true }", wantCheck: "x-vgw-cluster", warning: true},
		{name: "body not buffered", old: "request_body_mode: BUFFERED", new: "request_body_mode: STREAMED", wantCheck: "must be BUFFERED"},
		{name: "stream closes before response ends", old: "response_trailer_mode: SEND", new: "response_trailer_mode: SKIP", wantCheck: "frees the slot early"},
		{name: "request trailers skipped", old: "request_trailer_mode: SEND", new: "request_trailer_mode: SKIP", wantCheck: "trailers but no body", warning: true},
		{name: "buffered response body", old: "response_body_mode: NONE", new: "response_body_mode: BUFFERED", wantCheck: "must be NONE or STREAMED"},
		{name: "idle timeout under the wait", old: "stream_idle_timeout: 960s", new: "stream_idle_timeout: 300s", wantCheck: "stream_idle_timeout"},
		{name: "idle timeout default", old: "          stream_idle_timeout: 960s\n", new: "", wantCheck: "504"},
		// A route's own idle_timeout replaces the connection manager's.
		{name: "route idle timeout under the wait", old: "timeout: 0s", new: "timeout: 0s\n                  idle_timeout: 300s", wantCheck: "routes[0]: has an idle timeout"},
		// Without max_message_timeout vgw holds a request up to message_timeout.
		{name: "message timeout over the idle timeout", old: "message_timeout: 0.2s", new: "message_timeout: 1200s", wantCheck: "under the 20m0s vgw may hold a request", noMaxMessage: true},
		{name: "no cluster_header route", old: "cluster_header: x-vgw-cluster", new: "cluster: vgw_extproc", all: true, wantCheck: "cluster_header"},
		// Only inference reaches the backends, and vgw is not asked about
		// what Envoy answers itself.
		{name: "a catch-all to the models", old: `              - match: { prefix: "/" }` + "\n", new: `              - match: { prefix: "/" }` + "\n                route: { cluster_header: x-vgw-cluster }\n              - match: { prefix: \"/never\" }\n", wantCheck: "sends /sleep, /wake_up"},
		{name: "vgw asked about a direct response", old: "                    disabled: true\n", new: "                    disabled: false\n", wantCheck: "vgw would admit them, and load their model, for nothing"},
		{name: "clients' x-vgw-* headers kept", old: "              - remove_on_match: { key_matcher: { prefix: x-vgw- } }\n", new: "              - remove: x-other\n", wantCheck: "a client's own x-vgw-cluster is not removed before the route is picked", warning: true},
		{name: "an inference path not routed", old: "|tokenize|", new: "|", wantCheck: "a request for /tokenize does not reach vgw", warning: true},
		{name: "route to missing cluster", old: "cluster_header: x-vgw-cluster", new: "cluster: nowhere", wantCheck: `cluster "nowhere" is not defined`},
		{name: "duplicate cluster", old: "  clusters:\n", new: "  clusters:\n  - name: vgw_extproc\n    connect_timeout: 1s\n", wantCheck: "duplicate cluster"},
		{name: "no max_message_timeout", old: "              max_message_timeout: 900s\n", new: "", wantCheck: "override_message_timeout", warning: true},
		{name: "route timeout default", old: "                  timeout: 0s\n", new: "", wantCheck: "cuts streamed responses", warning: true},
		{name: "ADS cluster missing", old: "envoy_grpc: { cluster_name: vgw_xds }", new: "envoy_grpc: { cluster_name: nowhere }", wantCheck: `cluster "nowhere" is not a static cluster`},
		{name: "ADS cluster without HTTP/2", old: "          http2_protocol_options:\n            # An ADS stream lives as long as Envoy: pings find a dead vgw.\n            connection_keepalive: { interval: 30s, timeout: 5s }\n", new: "          http_protocol_options: {}\n", wantCheck: `cluster "vgw_xds" must speak HTTP/2`},
		{name: "CDS not over ADS", old: "  cds_config:\n    ads: {}\n", new: "  cds_config:\n    path_config_source: {path: /etc/envoy/cds.yaml}\n", wantCheck: "must be ads"},
		{name: "xDS without a node id", old: "  id: vgw-envoy\n", new: "", wantCheck: "must have a node id"},
		{name: "node metadata naming another Envoy", old: "{ key: x-vgw-node, value: \"%HOSTNAME%\" }", new: "{ key: x-vgw-node, value: other }", wantCheck: "another Envoy's xDS acknowledgement"},
		{name: "no node metadata", old: "                initial_metadata:\n                - { key: x-vgw-node, value: \"%HOSTNAME%\" }\n", new: "", wantCheck: "cannot tell which Envoy", warning: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if !strings.Contains(string(orig), tt.old) {
				t.Fatalf("envoy.yaml no longer contains %q; update the test", tt.old)
			}
			n := 1
			if tt.all {
				n = -1
			}
			broken := strings.Replace(string(orig), tt.old, tt.new, n)
			if tt.noMaxMessage {
				broken = strings.Replace(broken, "max_message_timeout: 900s", "max_message_timeout: 0s", 1)
			}
			b, err := Parse([]byte(broken))
			if tt.wantParse != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantParse) {
					t.Fatalf("Parse error = %v, want one mentioning %q", err, tt.wantParse)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			ps := Check(b)
			for _, p := range ps {
				if strings.Contains(p.String(), tt.wantCheck) {
					if p.Warning != tt.warning {
						t.Fatalf("problem %q: warning = %v, want %v", p, p.Warning, tt.warning)
					}
					return
				}
			}
			t.Fatalf("Check found %v, want a problem mentioning %q", ps, tt.wantCheck)
		})
	}
}

func TestExtProc(t *testing.T) {
	b, err := Load("envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ep, err := ExtProc(b)
	if err != nil {
		t.Fatal(err)
	}
	if got := ep.GetGrpcService().GetEnvoyGrpc().GetClusterName(); got != "vgw_extproc" {
		t.Fatalf("ext_proc cluster = %q", got)
	}
	if _, err := ExtProc(&bootstrapv3.Bootstrap{}); err == nil {
		t.Fatal("ExtProc found a filter in an empty bootstrap")
	}
}

// TestCheckAgainstIdleTimeout: vgw's envoy.stream_idle_timeout must be the
// idle timeout of the route vgw names clusters for, which a route's own
// idle_timeout sets over the connection manager's.
func TestCheckAgainstIdleTimeout(t *testing.T) {
	orig, err := os.ReadFile("envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := Expect{MessageTimeout: 200 * time.Millisecond, MaxMessageTimeout: 900 * time.Second, MaxBodyBytes: 8 << 20, MaxAudioBodyBytes: 25 << 20, StreamIdleTimeout: 960 * time.Second}
	for _, tc := range []struct {
		name, old, new, problem string
	}{
		{name: "as shipped"},
		{name: "the connection manager's differs", old: "stream_idle_timeout: 960s", new: "stream_idle_timeout: 1200s", problem: "listeners[0] stream_idle_timeout"},
		{name: "the route's own overrides it", old: "timeout: 0s", new: "timeout: 0s\n                  idle_timeout: 3600s", problem: "routes[0].route.idle_timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			text := string(orig)
			if tc.old != "" {
				if !strings.Contains(text, tc.old) {
					t.Fatalf("envoy.yaml no longer contains %q; update the test", tc.old)
				}
				text = strings.Replace(text, tc.old, tc.new, 1)
			}
			b, err := Parse([]byte(text))
			if err != nil {
				t.Fatal(err)
			}
			ps := CheckAgainst(b, want)
			switch {
			case tc.problem == "" && len(ps) > 0:
				t.Fatalf("problems %v", ps)
			case tc.problem != "" && (len(ps) != 1 || !strings.Contains(ps[0].String(), tc.problem)):
				t.Fatalf("problems %v, want one about %s", ps, tc.problem)
			}
		})
	}
}

// TestCheckAgainstTrustedHeader: where vgw trusts x-vgw-model, Envoy must
// not drop it as the request arrives, as the shipped bootstraps do.
func TestCheckAgainstTrustedHeader(t *testing.T) {
	b, err := Load("envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := Expect{MessageTimeout: 200 * time.Millisecond, MaxMessageTimeout: 900 * time.Second, MaxBodyBytes: 8 << 20, MaxAudioBodyBytes: 25 << 20, StreamIdleTimeout: 960 * time.Second}
	if ps := CheckAgainst(b, want); len(ps) > 0 {
		t.Fatalf("as shipped: %v", ps)
	}
	want.TrustModelHeader = true
	ps := CheckAgainst(b, want)
	if len(ps) != 1 || !strings.Contains(ps[0].String(), "removes x-vgw-model") {
		t.Fatalf("trusted: %v, want one problem about x-vgw-model", ps)
	}
	fr, _ := FrontOf(b)
	for header, want := range map[string]bool{"x-vgw-model": true, "X-VGW-Cluster": false, "x-vgw-cluster": true, "x-request-id": false} {
		if got := StripsEarly(fr.HCM, header); got != want {
			t.Errorf("StripsEarly(%q) = %v, want %v", header, got, want)
		}
	}
}

// TestBodyLimitPrecedence: the body limit Envoy applies to vgw's route is
// the route's own, else its virtual host's, else the deprecated
// per-request ones, and it only ever raises the listener's per-connection
// limit (config_impl.cc getRequestBodyBufferLimit, conn_manager_impl.cc
// refreshBufferLimit).
func TestBodyLimitPrecedence(t *testing.T) {
	orig, err := os.ReadFile("envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	const route = "                route:\n                  # vgw names the cluster;"
	const vhost = "              request_body_buffer_limit: 8388608\n"
	noVhost := [2]string{vhost, ""}
	http1 := [2]string{"codec_type: AUTO", "codec_type: HTTP1"}
	window := "          http2_protocol_options: { initial_stream_window_size: 8388608 }\n"
	for _, tc := range []struct {
		name  string
		edits [][2]string // old, new
		want  int64
	}{
		{name: "as shipped: the virtual host's", want: 8 << 20},
		{name: "the route's own first", edits: [][2]string{{route, "                request_body_buffer_limit: 16777216\n" + route}}, want: 16 << 20},
		{name: "HTTP/1: never under the connection's", edits: [][2]string{http1, {vhost, "              request_body_buffer_limit: 1024\n"}}, want: 1 << 20},
		{name: "HTTP/1: the route's deprecated one", edits: [][2]string{http1, noVhost, {route, "                per_request_buffer_limit_bytes: 4194304\n" + route}}, want: 4 << 20},
		{name: "HTTP/1: none, the connection's", edits: [][2]string{http1, noVhost}, want: 1 << 20},
		// Over HTTP/2 a stream starts at its receive window
		// (http2/codec_impl.cc), 16 MiB unless set.
		{name: "HTTP/2: never under the stream window", edits: [][2]string{noVhost}, want: 8 << 20},
		{name: "HTTP/2: the default window", edits: [][2]string{{window, ""}}, want: 16 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			text := string(orig)
			for _, e := range tc.edits {
				if !strings.Contains(text, e[0]) {
					t.Fatalf("envoy.yaml no longer contains %q; update the test", e[0])
				}
				text = strings.Replace(text, e[0], e[1], 1)
			}
			b, err := Parse([]byte(text))
			if err != nil {
				t.Fatal(err)
			}
			r, ok := RouteOf(b, "/v1/chat/completions")
			if !ok || r.BodyBufferLimit != tc.want {
				t.Fatalf("limit %d (found %v), want %d", r.BodyBufferLimit, ok, tc.want)
			}
		})
	}
}

// TestCheckAgainstH2Window: with HTTP/2 accepted and the stream window
// left at its 16 MiB, a body between vgw's receive limit and the window
// would reach vgw whole and fail with Envoy's 500: envoy-check says so.
func TestCheckAgainstH2Window(t *testing.T) {
	orig, err := os.ReadFile("envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	// vgw's audio limit as low as its JSON one: the receive limit is then
	// 9 MiB, under the default window.
	want := Expect{MessageTimeout: 200 * time.Millisecond, MaxMessageTimeout: 900 * time.Second, MaxBodyBytes: 8 << 20, MaxAudioBodyBytes: 8 << 20, RecvLimit: 9 << 20, StreamIdleTimeout: 960 * time.Second}
	for _, tc := range []struct {
		name    string
		window  bool
		problem string
	}{
		{name: "as shipped", window: true},
		{name: "the default window", problem: "initial_stream_window_size: is 16777216 bytes, over the 9437184 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			text := strings.Replace(string(orig), "request_body_buffer_limit: 26214400", "request_body_buffer_limit: 8388608", 1)
			if !tc.window {
				text = strings.Replace(text, "          http2_protocol_options: { initial_stream_window_size: 8388608 }\n", "", 1)
			}
			b, err := Parse([]byte(text))
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, p := range CheckAgainst(b, want) {
				got = append(got, p.String())
			}
			found := tc.problem == "" && len(got) == 0
			for _, g := range got {
				found = found || (tc.problem != "" && strings.Contains(g, tc.problem))
			}
			if !found {
				t.Fatalf("problems %q, want %q", got, tc.problem)
			}
		})
	}
}

// TestCheckAgainstObjectiveHeader: the shipped bootstraps drop a client's
// x-gateway-inference-objective, so no client sets its own priority; an
// objective_header they leave alone is warned about.
func TestCheckAgainstObjectiveHeader(t *testing.T) {
	for _, file := range []string{"envoy.yaml", "envoy-local.yaml"} {
		b, err := Load(file)
		if err != nil {
			t.Fatal(err)
		}
		fr, _ := FrontOf(b)
		if !StripsEarly(fr.HCM, "x-gateway-inference-objective") || StripsEarly(fr.HCM, "x-gateway-inference-fairness-id") {
			t.Errorf("%s: the objective header must be dropped, the tenant header kept", file)
		}
		want := Expect{MessageTimeout: 200 * time.Millisecond, MaxMessageTimeout: 900 * time.Second, MaxBodyBytes: 8 << 20, MaxAudioBodyBytes: 25 << 20,
			StreamIdleTimeout: 960 * time.Second, ObjectiveHeader: "x-gateway-inference-objective"}
		if file == "envoy-local.yaml" {
			continue // its limits differ; the header is what this test is about
		}
		if ps := CheckAgainst(b, want); len(ps) > 0 {
			t.Fatalf("%s as shipped: %v", file, ps)
		}
		want.ObjectiveHeader = "x-priority"
		if ps := CheckAgainst(b, want); len(ps) != 1 || !ps[0].Warning || !strings.Contains(ps[0].String(), "chooses its own priority") {
			t.Fatalf("%s with objective_header x-priority: %v, want one warning", file, ps)
		}
	}
}
