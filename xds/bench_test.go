package xds_test

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/vgw-project/vgw/xds"
	"github.com/vgw-project/vgw/xds/xdstest"
)

func manyModels(n int) *models {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("m%03d", i)
	}
	return newModels(names...)
}

// BenchmarkChangeToACK times a manager change (a model's endpoint moves)
// until the Envoy-role client has acknowledged the version with it, with
// 200 models configured. Baseline in the same run: a gRPC health check on
// the same connection, the floor of one round trip.
func BenchmarkChangeToACK(b *testing.B) {
	f := start(b, manyModels(200))
	c := f.envoy(b, "envoy-1")
	wait(b, c, "configured", func(c *xdstest.Client) bool { return c.Cluster("model/m000") != nil })
	hc := healthpb.NewHealthClient(f.conn)
	var change, floor []time.Duration
	i := 0
	for b.Loop() {
		addr := fmt.Sprintf("10.0.%d.%d:8000", i/250, i%250+1)
		i++
		start := time.Now()
		f.src.set("m007", addr)
		f.src.publish()
		wait(b, c, "acknowledged", routes("model/m007", addr))
		change = append(change, time.Since(start))

		b.StopTimer()
		t := time.Now()
		hc.Check(context.Background(), &healthpb.HealthCheckRequest{})
		floor = append(floor, time.Since(t))
		b.StartTimer()
	}
	b.ReportMetric(ms(pct(change, 50)), "change-to-ack-p50-ms")
	b.ReportMetric(ms(pct(change, 99)), "change-to-ack-p99-ms")
	b.ReportMetric(ms(pct(floor, 50)), "grpc-roundtrip-p50-ms")
}

// BenchmarkBuild200 times building the snapshot of 200 models, each with
// an endpoint.
func BenchmarkBuild200(b *testing.B) {
	src := manyModels(200)
	for i := range 200 {
		src.set(fmt.Sprintf("m%03d", i), fmt.Sprintf("10.0.0.%d:8000", i+1))
	}
	models := src.Models()
	// What one snapshot of 200 models holds on to.
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	kept, err := xds.Build("v", models, xds.DefaultSettings)
	if err != nil {
		b.Fatal(err)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	retained := float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / 1024
	runtime.KeepAlive(kept)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := xds.Build("v", models, xds.DefaultSettings); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(retained, "snapshot-KiB")
}

// BenchmarkPush200 times a change to all 200 models, from Notify until the
// client has acknowledged every new endpoint.
func BenchmarkPush200(b *testing.B) {
	f := start(b, manyModels(200))
	c := f.envoy(b, "envoy-1")
	wait(b, c, "configured", func(c *xdstest.Client) bool { return c.Cluster("model/m199") != nil })
	round := 0
	for b.Loop() {
		round++
		for i := range 200 {
			f.src.set(fmt.Sprintf("m%03d", i), fmt.Sprintf("10.%d.0.%d:8000", round%250, i+1))
		}
		f.src.publish()
		last := fmt.Sprintf("10.%d.0.200:8000", round%250)
		wait(b, c, "all acknowledged", routes("model/m199", last))
	}
}

func pct(xs []time.Duration, p int) time.Duration {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
