package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

var composeFiles = "../../docker-compose.yaml,../../docker-compose.sim.yaml"

// shipped returns the files make envoy-api checks.
func shipped(t *testing.T) []string {
	t.Helper()
	var files []string
	for _, g := range []string{"../*.yaml", "../../xds/testdata/*.golden.json"} {
		m, err := filepath.Glob(g)
		if err != nil || len(m) == 0 {
			t.Fatalf("no files match %s (%v)", g, err)
		}
		files = append(files, m...)
	}
	return files
}

func runCheck(t *testing.T, args ...string) (int, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	rc := run(args, &out, &errOut)
	return rc, out.String() + errOut.String()
}

func TestBuiltWithTheRequiredRelease(t *testing.T) {
	v, err := builtEnvoyAPI()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile("go.mod")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), envoyModule+" "+v.version+"\n") {
		t.Fatalf("the build information says %s %s, go.mod requires otherwise", envoyModule, v.version)
	}
}

func TestShippedFilesAccepted(t *testing.T) {
	rc, out := runCheck(t, append([]string{"-compose", composeFiles}, shipped(t)...)...)
	if rc != 0 || !strings.Contains(out, "envoy-api: OK: 2 bootstrap(s)") {
		t.Fatalf("exit %d:\n%s", rc, out)
	}
}

// withFilter returns envoy.yaml with key set to value in the typed_config
// of the first HTTP filter whose name contains filter, or in the
// connection manager's own typed_config when filter is "".
func withFilter(t *testing.T, filter, key string, value any) string {
	t.Helper()
	data, err := os.ReadFile("../envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var b map[string]any
	if err := yaml.Unmarshal(data, &b); err != nil {
		t.Fatal(err)
	}
	get := func(m any, path ...any) any {
		for _, p := range path {
			switch p := p.(type) {
			case string:
				m = m.(map[string]any)[p]
			case int:
				m = m.([]any)[p]
			}
		}
		return m
	}
	hcm := get(b, "static_resources", "listeners", 0, "filter_chains", 0, "filters", 0, "typed_config").(map[string]any)
	target := hcm
	if filter != "" {
		target = nil
		for _, f := range hcm["http_filters"].([]any) {
			if strings.Contains(get(f, "name").(string), filter) {
				target = get(f, "typed_config").(map[string]any)
				break
			}
		}
		if target == nil {
			t.Fatalf("envoy.yaml has no %s filter", filter)
		}
	}
	target[key] = value
	out, err := yaml.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "envoy.yaml")
	if err := os.WriteFile(path, out, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestNewerFieldsRefused: fields that go-control-plane/envoy v1.40.0 has
// and v1.39.0 has not, so Envoy 1.40 would load them and Envoy 1.39 refuse
// the bootstrap: HttpConnectionManager.record_route_resolution_stats (field
// 63) and ext_proc's ExternalProcessor.emit_client_span (field 27). The
// main module's vgw envoy-check, built with v1.40, accepts both.
func TestNewerFieldsRefused(t *testing.T) {
	for _, tc := range []struct {
		filter, key string
		value       any
	}{
		{"", "record_route_resolution_stats", true},
		{"ext_proc", "emit_client_span", false},
	} {
		t.Run(tc.key, func(t *testing.T) {
			path := withFilter(t, tc.filter, tc.key, tc.value)
			rc, out := runCheck(t, "-compose", composeFiles, path)
			if rc != 1 || !strings.Contains(out, path+": Bootstrap: ") || !strings.Contains(out, `unknown field "`+tc.key+`"`) {
				t.Fatalf("exit %d:\n%s", rc, out)
			}
		})
	}
}

// TestValidatedInsideAnys: an empty stat_prefix breaks a rule of the
// connection manager, which sits in an Any the bootstrap's own validator
// does not enter.
func TestValidatedInsideAnys(t *testing.T) {
	path := withFilter(t, "", "stat_prefix", "")
	rc, out := runCheck(t, "-compose", composeFiles, path)
	if rc != 1 || !strings.Contains(out, "filters[0].typed_config<HttpConnectionManager>: invalid HttpConnectionManager.StatPrefix") {
		t.Fatalf("exit %d:\n%s", rc, out)
	}
}

func TestXDSResourcesChecked(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct{ json, want string }{
		// Cluster.stats_matcher is new in v1.40.0.
		{`{"type.googleapis.com/envoy.config.cluster.v3.Cluster": [{"name": "m", "statsMatcher": {"rejectAll": true}}]}`,
			`Cluster[0]: proto:`},
		{`{"type.googleapis.com/envoy.config.cluster.v3.Cluster": [{"name": "m", "typedExtensionProtocolOptions": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {"@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions", "commonHttpProtocolOptions": {"idleTimeout": "4s"}}}}]}`,
			`Cluster[0].typed_extension_protocol_options[envoy.extensions.upstreams.http.v3.HttpProtocolOptions]<HttpProtocolOptions>: invalid HttpProtocolOptions.UpstreamProtocolOptions: value is required`},
		{`{"type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": [{"clusterName": "m"}, {"clusterName": ""}]}`,
			`ClusterLoadAssignment[1]: invalid ClusterLoadAssignment.ClusterName`},
		{`{"type.googleapis.com/envoy.config.listener.v3.Listener": []}`,
			`type.googleapis.com/envoy.config.listener.v3.Listener: not a resource type vgw sends`},
	} {
		path := write("x.golden.json", tc.json)
		rc, out := runCheck(t, "-compose", composeFiles, path)
		if rc != 1 || !strings.Contains(out, path+": "+tc.want) {
			t.Errorf("%s: exit %d, want %q:\n%s", tc.json, rc, tc.want, out)
		}
	}
}

func TestComposeRefused(t *testing.T) {
	dir := t.TempDir()
	compose := func(name, image string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("services:\n  envoy:\n    image: "+image+"\n  vgw:\n    image: vgw:local\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	boot := shipped(t)[:1]
	for _, tc := range []struct {
		name  string
		files []string
		want  []string
	}{
		{"newer Envoy", []string{compose("a.yaml", "envoyproxy/envoy:v1.40.1")},
			[]string{"services.envoy.image: envoyproxy/envoy:v1.40.1 is Envoy 1.40, but envoy/pinned is built with " + envoyModule + " v1.39.0",
				"bump the require in envoy/pinned/go.mod to the newest " + envoyModule + " v1.40.x release"}},
		{"older Envoy", []string{compose("b.yaml", "docker.io/envoyproxy/envoy:distroless-v1.38.4")},
			[]string{"is Envoy 1.38", "v1.38.x release"}},
		{"disagreeing files", []string{compose("c.yaml", "envoyproxy/envoy:v1.39.6"), compose("d.yaml", "envoyproxy/envoy:v1.39.5")},
			[]string{"d.yaml: services.envoy.image: envoyproxy/envoy:v1.39.5 disagrees with " + filepath.Join(dir, "c.yaml") + "'s envoyproxy/envoy:v1.39.6"}},
		{"no version", []string{compose("e.yaml", "envoyproxy/envoy:latest")},
			[]string{"cannot tell the Envoy version"}},
		{"no Envoy", []string{compose("f.yaml", "nginx:1")},
			[]string{"no envoyproxy/envoy:vX.Y.Z image"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc, out := runCheck(t, append([]string{"-compose", strings.Join(tc.files, ",")}, boot...)...)
			if rc != 1 {
				t.Fatalf("exit %d:\n%s", rc, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("want %q in:\n%s", w, out)
				}
			}
		})
	}
}

func TestUsage(t *testing.T) {
	if rc, _ := runCheck(t, "../envoy.yaml"); rc != 2 {
		t.Fatalf("no -compose: exit %d, want 2", rc)
	}
}
