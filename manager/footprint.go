package manager

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Footprint is the GPU memory a model was measured to use on each of its
// GPUs, with the signature of the settings it was measured under.
type Footprint struct {
	Signature string    `json:"signature"`
	PerGPU    uint64    `json:"per_gpu_bytes"`
	Measured  time.Time `json:"measured"`
	// How says how it was measured: "processes" (its processes' memory),
	// "delta" (the GPU's used memory before and after it loaded alone).
	// PerGPU is 0, and How empty, while only its sleep was measured.
	How string `json:"how"`
	// What its server keeps asleep, as last measured under the same
	// signature (sleep.go): of each of its GPUs, and of host memory at
	// level 1 and at level 2; 0 where not measured. Kept so that a
	// restarted vgw counts its sleepers, adopted or new, at what they
	// hold, not at the most they might.
	Residual   uint64 `json:"residual_bytes,omitempty"`
	HostLevel1 uint64 `json:"asleep_level1_host_bytes,omitempty"`
	HostLevel2 uint64 `json:"asleep_level2_host_bytes,omitempty"`
}

// Footprints keeps learned footprints, in memory and, when it has a path,
// in a JSON file written atomically (temp file, then rename), so a crash
// mid-write leaves the old file whole.
type Footprints struct {
	path    string
	mu      sync.Mutex // guards byModel
	byModel map[string]Footprint
	// writing serialises writes of the file, so that each writes the
	// newest state and none is overtaken by an older one. It is held
	// across the write, and only by writers; readers take mu alone.
	writing sync.Mutex
}

// OpenFootprints loads the footprint file at path; an empty path keeps
// footprints in memory only. A missing file is an empty one. A path that
// is a directory is an error, since a bind mount Docker created as a
// directory would otherwise eat every write (the Python gateway's lesson).
// A file that cannot be parsed is an error too: it is not overwritten
// without an operator looking.
func OpenFootprints(path string) (*Footprints, error) {
	f := &Footprints{path: path, byModel: map[string]Footprint{}}
	if path == "" {
		return f, nil
	}
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		dir := filepath.Dir(path)
		if d, err := os.Stat(dir); err != nil || !d.IsDir() {
			return nil, fmt.Errorf("footprints file %s: its directory %s does not exist", path, dir)
		}
		return f, nil
	case err != nil:
		return nil, fmt.Errorf("footprints file: %w", err)
	case st.IsDir():
		return nil, fmt.Errorf("footprints file %s is a directory (a bind mount of a file that did not exist?)", path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("footprints file: %w", err)
	}
	if len(data) > 0 {
		if err := json.Unmarshal(data, &f.byModel); err != nil {
			return nil, fmt.Errorf("footprints file %s: %w", path, err)
		}
	}
	return f, nil
}

// Get returns the footprint learned for model under signature. A footprint
// measured under other settings is stale and ignored.
func (f *Footprints) Get(model, signature string) (Footprint, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fp, ok := f.byModel[model]
	if !ok || fp.Signature != signature {
		return Footprint{}, false
	}
	return fp, true
}

// All returns every footprint kept.
func (f *Footprints) All() map[string]Footprint {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[string]Footprint, len(f.byModel))
	for k, v := range f.byModel {
		out[k] = v
	}
	return out
}

// Put records a footprint and writes the file. Concurrent Puts write one
// at a time, each the state as it is when its turn comes, so the file
// never loses a footprint that an earlier write had.
func (f *Footprints) Put(model string, fp Footprint) error {
	f.mu.Lock()
	f.byModel[model] = fp
	f.mu.Unlock()
	return f.write()
}

// Update changes model's footprint under signature (the one kept, if it
// was measured under the same signature, else a new one) as change says,
// and writes the file: a measurement of one part keeps the others.
func (f *Footprints) Update(model, signature string, change func(*Footprint)) error {
	f.mu.Lock()
	fp := f.byModel[model]
	if fp.Signature != signature {
		fp = Footprint{Signature: signature}
	}
	change(&fp)
	f.byModel[model] = fp
	f.mu.Unlock()
	return f.write()
}

// write writes the file, if there is one.
func (f *Footprints) write() error {
	if f.path == "" {
		return nil
	}
	f.writing.Lock()
	defer f.writing.Unlock()
	f.mu.Lock()
	data, err := json.MarshalIndent(f.byModel, "", "  ")
	f.mu.Unlock()
	if err != nil {
		return fmt.Errorf("footprints file %s: %w", f.path, err)
	}
	return writeAtomic(f.path, data)
}

// writeAtomic replaces path with data, or leaves it as it was.
func writeAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // gone after a successful rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
