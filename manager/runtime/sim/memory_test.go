package sim_test

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"
)

// BenchmarkWaitingMemory measures what the manager holds for 200
// configured models and 10,000 requests waiting in Lease for models that
// are loading: heap and goroutine stacks, per waiting request.
func BenchmarkWaitingMemory(b *testing.B) {
	var cfg strings.Builder
	cfg.WriteString(strings.Replace(baseConfig, "load_timeout: 1m", "load_timeout: 1h", 1) + "models:\n")
	for i := range 200 {
		fmt.Fprintf(&cfg, "  m%03d: {vram: 70GiB, sim: {startup_delay: 1h}}\n", i)
	}
	for b.Loop() {
		tm := startManager(b, cfg.String())
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		ctx, cancel := context.WithCancel(context.Background())
		const waiting = 10000
		for i := range waiting {
			go tm.Lease(ctx, fmt.Sprintf("m%03d", i%10))
		}
		for deadline := time.Now().Add(30 * time.Second); ; {
			n := 0
			for _, s := range tm.View().Models {
				n += s.Waiting
			}
			if n == waiting {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("%d of %d waiting", n, waiting)
			}
			time.Sleep(10 * time.Millisecond) // polling interval
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		heap := float64(after.HeapAlloc) - float64(before.HeapAlloc)
		stack := float64(after.StackInuse) - float64(before.StackInuse)
		b.ReportMetric(heap/waiting, "heap-B/waiter")
		b.ReportMetric(stack/waiting, "stack-B/waiter")
		b.ReportMetric(float64(before.HeapAlloc)/(1<<20), "heap-MiB-200-models")
		cancel()
	}
}
