package manager

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vgw-project/vgw/manager/managertest"
)

func TestFootprints(t *testing.T) {
	path := filepath.Join(t.TempDir(), "footprints.json")
	f, err := OpenFootprints(path)
	if err != nil {
		t.Fatal(err)
	}
	fp := Footprint{Signature: "sig1", PerGPU: 21 << 30, Measured: time.Unix(1000, 0).UTC(), How: "processes"}
	if err := f.Put("llama", fp); err != nil {
		t.Fatal(err)
	}
	again, err := OpenFootprints(path)
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := again.Get("llama", "sig1"); !ok || got != fp {
		t.Fatalf("reloaded %+v %v, want %+v", got, ok, fp)
	}
	if _, ok := again.Get("llama", "sig2"); ok {
		t.Fatal("a footprint measured under other settings was used")
	}
	// No temp files are left behind.
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Fatalf("directory holds %d files, want only the footprints file", len(entries))
	}
}

// TestFootprintWriteFailureKeepsOld: when the new file cannot be written,
// the old one stays whole.
func TestFootprintWriteFailureKeepsOld(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "footprints.json")
	f, _ := OpenFootprints(path)
	f.Put("a", Footprint{Signature: "s", PerGPU: 1})
	before, _ := os.ReadFile(path)
	managertest.ReadOnly(t, dir)
	if err := f.Put("b", Footprint{Signature: "s", PerGPU: 2}); err == nil {
		t.Fatal("a write into a read-only directory succeeded")
	}
	after, _ := os.ReadFile(path)
	if string(before) != string(after) {
		t.Fatal("the old footprints file changed")
	}
}

func TestFootprintPaths(t *testing.T) {
	dir := t.TempDir()
	if _, err := OpenFootprints(dir); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Fatalf("a directory: %v", err)
	}
	if _, err := OpenFootprints(filepath.Join(dir, "missing", "f.json")); err == nil {
		t.Fatal("a file in a missing directory was accepted")
	}
	bad := filepath.Join(dir, "bad.json")
	os.WriteFile(bad, []byte("{not json"), 0o600)
	if _, err := OpenFootprints(bad); err == nil {
		t.Fatal("a corrupt file was accepted")
	}
	f, err := OpenFootprints("")
	if err != nil || f.Put("a", Footprint{}) != nil {
		t.Fatalf("in memory: %v", err)
	}
}

// TestFootprintsConcurrentPuts: models measured at the same moment all
// reach the file. Each Put wrote what it had marshalled, after the lock:
// a write carrying fewer footprints could land last (27 of 50 trials lost
// some, with 8 Puts).
func TestFootprintsConcurrentPuts(t *testing.T) {
	const puts = 8
	for trial := range 50 {
		path := filepath.Join(t.TempDir(), "footprints.json")
		f, err := OpenFootprints(path)
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range puts {
			wg.Go(func() {
				<-start
				if err := f.Put(fmt.Sprintf("m%d", i), Footprint{Signature: "s", PerGPU: uint64(i + 1)}); err != nil {
					t.Error(err)
				}
			})
		}
		close(start)
		wg.Wait()
		again, err := OpenFootprints(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := len(again.All()); got != puts {
			t.Fatalf("trial %d: the file holds %d footprints after %d concurrent puts", trial, got, puts)
		}
	}
}

// TestFootprintUpdate: a measurement of one part of a footprint keeps the
// others, under the same signature; under another it starts afresh.
func TestFootprintUpdate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "footprints.json")
	f, err := OpenFootprints(path)
	if err != nil {
		t.Fatal(err)
	}
	f.Update("a", "s1", func(fp *Footprint) { fp.PerGPU, fp.How = 20<<30, "processes" })
	f.Update("a", "s1", func(fp *Footprint) { fp.Residual, fp.HostLevel1 = 1<<30, 15<<30 })
	again, err := OpenFootprints(path)
	if err != nil {
		t.Fatal(err)
	}
	if fp, ok := again.Get("a", "s1"); !ok || fp.PerGPU != 20<<30 || fp.How != "processes" || fp.Residual != 1<<30 || fp.HostLevel1 != 15<<30 {
		t.Fatalf("after two updates and a reopen: %+v, %v", fp, ok)
	}
	f.Update("a", "s2", func(fp *Footprint) { fp.HostLevel2 = 1 << 20 })
	if fp, _ := f.Get("a", "s2"); fp.PerGPU != 0 || fp.HostLevel1 != 0 || fp.HostLevel2 != 1<<20 {
		t.Fatalf("under new settings: %+v", fp)
	}
}
