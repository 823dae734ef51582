package envoy

import (
	"os"
	"slices"
	"strings"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/extproc"
)

// brokenEdits are TestBrokenConfigs' edits of envoy.yaml, one bug each, so
// that the fuzzer starts next to every check rather than having to find
// its way past the parser to them.
var brokenEdits = []struct{ old, new string }{
	{"codec_type: AUTO", "codec_typo: AUTO"},
	{"request_body_mode: BUFFERED", "request_body_mode: BUFFERD"},
	{"type.googleapis.com/envoy.extensions.filters.http.router.v3.Router", "type.googleapis.com/envoy.extensions.filters.http.nope.v3.Nope"},
	{"stat_prefix: openai", `stat_prefix: ""`},
	{"connect_timeout: 1s", "connect_timeout: -1s"},
	{"envoy_grpc: { cluster_name: vgw_extproc }", "envoy_grpc: { cluster_name: nowhere }"},
	{"          http2_protocol_options: {}\n", "          http_protocol_options: {}\n"},
	{"          - name: envoy.filters.http.ext_proc\n", "          - name: envoy.filters.http.router\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n          - name: envoy.filters.http.ext_proc\n"},
	{"failure_mode_allow: false", "failure_mode_allow: true"},
	{"request_body_mode: BUFFERED", "request_body_mode: STREAMED"},
	{"response_trailer_mode: SEND", "response_trailer_mode: SKIP"},
	{"response_body_mode: NONE", "response_body_mode: BUFFERED"},
	{"stream_idle_timeout: 960s", "stream_idle_timeout: 300s"},
	{"          stream_idle_timeout: 960s\n", ""},
	{"cluster_header: x-vgw-cluster", "cluster: vgw_extproc"},
	{"cluster_header: x-vgw-cluster", "cluster: nowhere"},
	{"  clusters:\n", "  clusters:\n  - name: vgw_extproc\n    connect_timeout: 1s\n"},
	{"              max_message_timeout: 900s\n", ""},
	{"                  timeout: 0s\n", ""},
	{"envoy_grpc: { cluster_name: vgw_xds }", "envoy_grpc: { cluster_name: nowhere }"},
	{"          http2_protocol_options:\n            # An ADS stream lives as long as Envoy: pings find a dead vgw.\n            connection_keepalive: { interval: 30s, timeout: 5s }\n", "          http_protocol_options: {}\n"},
	{"  cds_config:\n    ads: {}\n", "  cds_config:\n    path_config_source: {path: /etc/envoy/cds.yaml}\n"},
	{"  id: vgw-envoy\n", ""},
	{"{ key: x-vgw-node, value: \"%HOSTNAME%\" }", "{ key: x-vgw-node, value: other }"},
	{"                initial_metadata:\n                - { key: x-vgw-node, value: \"%HOSTNAME%\" }\n", ""},
}

// fuzzExpect is what the default vgw config asks of Envoy, built the way
// vgw envoy-check --config builds it, so that the fuzzer also drives
// CheckAgainst.
var fuzzExpect = Expect{
	MessageTimeout:    config.Defaults.Envoy.MessageTimeout.Std(),
	MaxMessageTimeout: config.Defaults.Envoy.MaxMessageTimeout.Std(),
	MaxBodyBytes:      int64(config.Defaults.MaxBodyBytes),
	RecvLimit:         int64(extproc.RecvLimit(int(config.Defaults.MaxBodyBytes))),
	StreamIdleTimeout: config.Defaults.Envoy.StreamIdleTimeout.Std(),
}

// verdict is everything vgw envoy-check reports on one input: a parse
// error, or the problems of Check and CheckAgainst.
type verdict struct {
	parseErr string
	problems []Problem
	b        *bootstrapv3.Bootstrap
}

func checkBytes(t *testing.T, data []byte) verdict {
	t.Helper()
	b, err := Parse(data)
	if err != nil {
		if err.Error() == "" {
			t.Fatalf("Parse failed with an empty error")
		}
		return verdict{parseErr: err.Error()}
	}
	ps := append(Check(b), CheckAgainst(b, fuzzExpect)...)
	for _, p := range ps {
		if p.Message == "" {
			t.Fatalf("problem at %q has no message", p.Path)
		}
	}
	return verdict{problems: ps, b: b}
}

// FuzzCheck feeds arbitrary bytes to the path vgw envoy-check --config
// takes: Parse, Check, CheckAgainst. None may panic, the same bytes must
// get the same report, and a bootstrap it accepts must still be accepted
// once re-marshalled, or the checker depends on how a file is spelled.
func FuzzCheck(f *testing.F) {
	for _, name := range []string{"envoy.yaml", "envoy-local.yaml"} {
		data, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	orig, err := os.ReadFile("envoy.yaml")
	if err != nil {
		f.Fatal(err)
	}
	for _, e := range brokenEdits {
		if !strings.Contains(string(orig), e.old) {
			f.Fatalf("envoy.yaml no longer contains %q; update brokenEdits", e.old)
		}
		f.Add([]byte(strings.Replace(string(orig), e.old, e.new, 1)))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		first := checkBytes(t, data)
		second := checkBytes(t, data)
		if first.parseErr != second.parseErr {
			t.Fatalf("Parse is not deterministic:\n%s\nthen\n%s", first.parseErr, second.parseErr)
		}
		if !slices.Equal(first.problems, second.problems) {
			t.Fatalf("the check is not deterministic:\n%v\nthen\n%v", first.problems, second.problems)
		}
		if first.b == nil || len(Errors(first.problems)) > 0 {
			return
		}
		js, err := protojson.Marshal(first.b)
		if err != nil {
			t.Fatalf("accepted a bootstrap that does not marshal: %v", err)
		}
		again := checkBytes(t, js)
		if again.parseErr != "" {
			t.Fatalf("accepted a bootstrap whose JSON does not parse: %s\n%s", again.parseErr, js)
		}
		if errs := Errors(again.problems); len(errs) > 0 {
			t.Fatalf("accepted a bootstrap, refused it re-marshalled: %v\n%s", errs, js)
		}
	})
}
