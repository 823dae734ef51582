// Package dockertest gives tests a real Docker engine to run the Docker
// runtime against: an image of the fake vLLM (built here, FROM scratch,
// since no registry can be reached), a network, and a runtime instance
// name per test, and removes all of it afterwards.
package dockertest

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/moby/moby/client"
)

// LabelTest marks the images and networks the tests create.
const LabelTest = "vgw.test"

// InstancePrefix starts the runtime instance name of every test.
const InstancePrefix = "vgwtest-"

// Engine is the Docker engine the tests use, ready for them.
type Engine struct {
	Client  *client.Client
	Image   string // the fake vLLM, as the vLLM image
	Network string
	run     string
	n       atomic.Int32
}

var (
	setup  = sync.OnceValues(start)
	errNo  = errors.New("no Docker engine")
	active atomic.Pointer[Engine]
)

// Need returns the engine, or skips the test when no engine is reachable.
// Anything else that goes wrong fails the test.
func Need(t testing.TB) *Engine {
	t.Helper()
	e, err := setup()
	if errors.Is(err, errNo) {
		t.Skipf("skipped: %v; the Docker runtime's tests need a reachable Docker engine (DOCKER_HOST or /var/run/docker.sock)", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// Instance returns a runtime instance name for one test, and removes
// every container of that instance when the test ends, whatever happened.
func (e *Engine) Instance(t testing.TB) string {
	name := fmt.Sprintf("%s%s-%d", InstancePrefix, e.run, e.n.Add(1))
	t.Cleanup(func() { e.RemoveInstance(name) })
	return name
}

// RemoveInstance removes every container and volume of a runtime
// instance.
func (e *Engine) RemoveInstance(instance string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	byInstance := make(client.Filters).Add("label", "vgw.instance="+instance)
	if list, err := e.Client.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: byInstance}); err == nil {
		for _, c := range list.Items {
			e.Client.ContainerRemove(ctx, c.ID, client.ContainerRemoveOptions{Force: true})
		}
	}
	if vols, err := e.Client.VolumeList(ctx, client.VolumeListOptions{Filters: byInstance}); err == nil {
		for _, v := range vols.Items {
			e.Client.VolumeRemove(ctx, v.Name, client.VolumeRemoveOptions{Force: true})
		}
	}
}

// Cleanup removes the image and the network; call it from TestMain after
// the tests ran.
func Cleanup() {
	e := active.Load()
	if e == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e.removeContainers(ctx, func(instance string, _ time.Time) bool { return strings.HasPrefix(instance, InstancePrefix+e.run+"-") })
	e.Client.NetworkRemove(ctx, e.Network, client.NetworkRemoveOptions{})
	e.Client.ImageRemove(ctx, e.Image, client.ImageRemoveOptions{Force: true, PruneChildren: true})
	e.Client.Close()
}

func start() (*Engine, error) {
	cli, err := client.New(client.FromEnv)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errNo, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := cli.Ping(ctx, client.PingOptions{}); err != nil {
		cli.Close()
		return nil, fmt.Errorf("%w at %s: %v", errNo, cli.DaemonHost(), err)
	}
	b := make([]byte, 3)
	rand.Read(b)
	run := hex.EncodeToString(b)
	e := &Engine{Client: cli, Image: "vgw-test-fakevllm:" + run, Network: "vgw-test-" + run, run: run}
	e.removeLeftovers(ctx)
	if err := e.buildImage(ctx); err != nil {
		cli.Close()
		return nil, err
	}
	active.Store(e)
	if _, err := cli.NetworkCreate(ctx, e.Network, client.NetworkCreateOptions{Driver: "bridge", Labels: map[string]string{LabelTest: "true"}}); err != nil {
		return nil, fmt.Errorf("create network %s: %w", e.Network, err)
	}
	return e, nil
}

// buildImage builds the fake vLLM without cgo and puts it alone in an
// image whose entrypoint takes vLLM's command line.
func (e *Engine) buildImage(ctx context.Context) error {
	dir, err := os.MkdirTemp("", "vgw-fakevllm-image")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "fakevllm")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/vgw-project/vgw/cmd/fakevllm")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build the fake vLLM: %w\n%s", err, out)
	}
	exe, err := os.ReadFile(bin)
	if err != nil {
		return err
	}
	var tarball bytes.Buffer
	tw := tar.NewWriter(&tarball)
	for _, f := range []struct {
		name string
		mode int64
		data []byte
	}{
		{"Dockerfile", 0o644, []byte("FROM scratch\nCOPY fakevllm /fakevllm\nENTRYPOINT [\"/fakevllm\"]\n")},
		{"fakevllm", 0o755, exe},
	} {
		if err := tw.WriteHeader(&tar.Header{Name: f.name, Mode: f.mode, Size: int64(len(f.data))}); err != nil {
			return err
		}
		tw.Write(f.data)
	}
	tw.Close()
	res, err := e.Client.ImageBuild(ctx, &tarball, client.ImageBuildOptions{
		Tags: []string{e.Image}, Labels: map[string]string{LabelTest: "true"}, Remove: true, ForceRemove: true,
	})
	if err != nil {
		return fmt.Errorf("build image %s: %w", e.Image, err)
	}
	defer res.Body.Close()
	// The build's progress is a stream of JSON messages; a failure is one
	// with an error in it.
	sc := bufio.NewScanner(res.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m struct{ Error string }
		if json.Unmarshal(sc.Bytes(), &m) == nil && m.Error != "" {
			return fmt.Errorf("build image %s: %s", e.Image, m.Error)
		}
	}
	if err := sc.Err(); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("build image %s: %w", e.Image, err)
	}
	return nil
}

// removeLeftovers removes what earlier runs that died left behind: test
// containers, images and networks more than an hour old (younger ones
// may belong to a run going on beside this one).
func (e *Engine) removeLeftovers(ctx context.Context) {
	old := time.Now().Add(-time.Hour)
	e.removeContainers(ctx, func(_ string, created time.Time) bool { return created.Before(old) })
	test := make(client.Filters).Add("label", LabelTest+"=true")
	if imgs, err := e.Client.ImageList(ctx, client.ImageListOptions{Filters: test}); err == nil {
		for _, img := range imgs.Items {
			if time.Unix(img.Created, 0).Before(old) {
				e.Client.ImageRemove(ctx, img.ID, client.ImageRemoveOptions{Force: true, PruneChildren: true})
			}
		}
	}
	managed := make(client.Filters).Add("label", "vgw.managed=true")
	if vols, err := e.Client.VolumeList(ctx, client.VolumeListOptions{Filters: managed}); err == nil {
		for _, v := range vols.Items {
			created, err := time.Parse(time.RFC3339, v.CreatedAt)
			if strings.HasPrefix(v.Labels["vgw.instance"], InstancePrefix) && err == nil && created.Before(old) {
				e.Client.VolumeRemove(ctx, v.Name, client.VolumeRemoveOptions{Force: true})
			}
		}
	}
	if nets, err := e.Client.NetworkList(ctx, client.NetworkListOptions{Filters: test}); err == nil {
		for _, n := range nets.Items {
			if n.Created.Before(old) {
				e.Client.NetworkRemove(ctx, n.ID, client.NetworkRemoveOptions{})
			}
		}
	}
}

// removeContainers removes the test containers that match.
func (e *Engine) removeContainers(ctx context.Context, match func(instance string, created time.Time) bool) {
	list, err := e.Client.ContainerList(ctx, client.ContainerListOptions{All: true,
		Filters: make(client.Filters).Add("label", "vgw.managed=true")})
	if err != nil {
		return
	}
	for _, c := range list.Items {
		inst := c.Labels["vgw.instance"]
		if strings.HasPrefix(inst, InstancePrefix) && match(inst, time.Unix(c.Created, 0)) {
			e.Client.ContainerRemove(ctx, c.ID, client.ContainerRemoveOptions{Force: true})
		}
	}
}
