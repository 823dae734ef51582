package xds

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/encoding/protojson"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// TestBuildGolden compares the snapshot of a small config with the golden
// file: a change to what Envoy is sent shows in review. Run with -update
// to accept a change.
func TestBuildGolden(t *testing.T) {
	models := []Model{
		{Cluster: "model/qwen2.5-32b", MaxConcurrent: 4},
		{Cluster: "model/llama-3.1-8b", MaxConcurrent: 8, Endpoints: []string{"172.18.0.5:8000"}},
	}
	for _, tc := range []struct {
		name string
		s    Settings
	}{
		{"snapshot", DefaultSettings},
		{"snapshot-health-checks", Settings{ConnectTimeout: 2 * time.Second, HealthCheckInterval: 10 * time.Second}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			snap, err := Build("v1", models, tc.s)
			if err != nil {
				t.Fatal(err)
			}
			out := map[string][]json.RawMessage{}
			for _, typ := range []string{resource.ClusterType, resource.EndpointType} {
				for _, name := range []string{"model/llama-3.1-8b", "model/qwen2.5-32b"} {
					r := snap.GetResources(typ)[name]
					b, err := protojson.MarshalOptions{Indent: "  "}.Marshal(r)
					if err != nil {
						t.Fatal(err)
					}
					out[typ] = append(out[typ], b)
				}
			}
			got, _ := json.MarshalIndent(out, "", "  ")
			var canon bytes.Buffer
			json.Indent(&canon, got, "", "  ")
			path := "testdata/" + tc.name + ".golden.json"
			if *update {
				os.WriteFile(path, canon.Bytes(), 0o644)
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./xds -update to write it)", err)
			}
			if !bytes.Equal(canon.Bytes(), want) {
				t.Fatalf("the snapshot differs from %s; if the change is meant, run go test ./xds -update and review the diff\ngot:\n%s", path, canon.Bytes())
			}
		})
	}
}

func TestBuildRejectsBadEndpoints(t *testing.T) {
	for _, ep := range []string{"nowhere", "10.0.0.1:http", "10.0.0.1:99999"} {
		if _, err := Build("v1", []Model{{Cluster: "model/a", MaxConcurrent: 1, Endpoints: []string{ep}}}, DefaultSettings); err == nil {
			t.Errorf("endpoint %q was accepted", ep)
		}
	}
}
