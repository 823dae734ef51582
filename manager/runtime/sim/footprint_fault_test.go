package sim_test

import (
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/manager/managertest"
)

// TestFootprintSaveFails: a footprint learned when the footprints file
// cannot be written costs the model nothing. It serves on, the footprint
// is kept in memory for the next placement, the old file stays as it was,
// and the failure is logged as an error naming the file.
func TestFootprintSaveFails(t *testing.T) {
	tests := []struct {
		name string
		// unwritable sets up the footprints file under root and returns
		// the path vgw is given, the path of the old file, and a func that
		// makes the path unwritable once vgw has opened it.
		unwritable func(t *testing.T, root string) (path, old string, spoil func())
	}{
		{"directory read-only", func(t *testing.T, root string) (string, string, func()) {
			path := filepath.Join(root, "footprints.json")
			return path, path, func() { managertest.ReadOnly(t, root) } // chattr +i as root: chmod does not stop root
		}},
		{"directory now a file", func(t *testing.T, root string) (string, string, func()) {
			// The footprints directory is reached through a link, as
			// through a mount point; the link comes to name a file.
			dir := filepath.Join(root, "v1")
			link := filepath.Join(root, "state")
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(dir, link); err != nil {
				t.Fatal(err)
			}
			return filepath.Join(link, "footprints.json"), filepath.Join(dir, "footprints.json"), func() {
				file := filepath.Join(root, "file")
				if err := os.WriteFile(file, nil, 0o600); err != nil {
					t.Fatal(err)
				}
				if err := os.Remove(link); err != nil {
					t.Fatal(err)
				}
				if err := os.Symlink(file, link); err != nil {
					t.Fatal(err)
				}
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path, old, spoil := tt.unwritable(t, t.TempDir())
			fps, err := manager.OpenFootprints(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := fps.Put("other", manager.Footprint{Signature: "s", PerGPU: 7 << 30, Measured: time.Unix(1000, 0).UTC(), How: "processes"}); err != nil {
				t.Fatal(err)
			}
			before, err := os.ReadFile(old)
			if err != nil {
				t.Fatal(err)
			}
			spoil()

			logs := &managertest.LogRecorder{}
			yaml := baseConfig + "models:\n  a: {vram: 20GiB}\n"
			tm := startManagerWith(t, yaml, nil, nil, manager.Options{Footprints: fps, Log: slog.New(logs)})
			if err := tm.ensure("a"); err != nil {
				t.Fatal(err)
			}
			poll.Until(t, "the failed save is logged", func() bool {
				return slices.ContainsFunc(logs.Records(), func(r slog.Record) bool {
					return r.Message == "could not save footprints" && r.Level == slog.LevelError
				})
			})
			i := slices.IndexFunc(logs.Records(), func(r slog.Record) bool { return r.Message == "could not save footprints" })
			if msg, _ := managertest.Attr(logs.Records()[i], "error").(string); !strings.Contains(msg, path) {
				t.Errorf("the error logged, %q, does not name the file %s", msg, path)
			}

			if st := tm.status("a"); st.State != manager.Ready {
				t.Errorf("a is %v after its footprint could not be saved", st.State)
			}
			if addr := tm.status("a").Endpoint; managertest.Chat(addr, "a") != http.StatusOK {
				t.Errorf("a at %s does not serve", addr)
			}
			cfg := managertest.Config(t, yaml)
			if fp, ok := fps.Get("a", manager.Signature(cfg, cfg.Models["a"])); !ok || fp.PerGPU != 20<<30 {
				t.Errorf("a's footprint in memory: %+v %v; want the 20GiB measured", fp, ok)
			}
			after, err := os.ReadFile(old)
			if err != nil || string(after) != string(before) {
				t.Errorf("the old footprints file changed (%v):\n%s\nwas\n%s", err, after, before)
			}
			if entries, _ := os.ReadDir(filepath.Dir(old)); len(entries) != 1 {
				t.Errorf("the old file's directory holds %d entries, want it alone", len(entries))
			}
		})
	}
}
