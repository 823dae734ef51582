// Package e2e runs the deployment as users run it, on the real Docker
// engine: docker-compose.sim.yaml's vgw service as a container with the
// Docker socket and declared GPUs, starting fake vLLM containers on its
// network; Envoy is played by envoy/envoytest against the container's
// ext_proc and xDS addresses, its router sending the HTTP to the endpoints
// xDS names. No image can be pulled, so vgw's image is built from the
// binary and the libraries it links (not from the Dockerfile), and the
// fake's FROM scratch.
package e2e

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"

	"github.com/vgw-project/vgw/envoy/envoytest"
	"github.com/vgw-project/vgw/manager/dockertest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	dockertest.Cleanup()
	os.Exit(code)
}

const e2eConfig = `log_format: json
load_timeout: 30s
drain_timeout: 5s
min_resident: 0s
runtime: {kind: docker, image: %s, network: %s, instance: %s}
gpus: [{name: sim0, memory: 80GiB}]
models:
  a: {repo: org/a, vram: 50GiB, env: {FAKEVLLM_STARTUP_DELAY: 200ms}}
  b: {repo: org/b, vram: 50GiB}
  small: {repo: org/small, vram: 10GiB, max_concurrent: 1, max_queue: 1, env: {FAKEVLLM_TOKENS_PER_SECOND: "5"}}
  c: {repo: org/c, vram: 10GiB, env: {FAKEVLLM_STARTUP_DELAY: 8s}}
`

// stack is the compose project under test.
type stack struct {
	t        *testing.T
	engine   *dockertest.Engine
	project  string
	env      []string
	instance string
	network  string
}

// TestComposeSim brings up the sim stack's vgw and drives it as Envoy
// would: a cold start, a warm request, a streamed one, a queue overflowing
// into 429, a swap when memory runs out, and `docker restart` of vgw with
// models running (adopted: the same containers, nothing started twice).
func TestComposeSim(t *testing.T) {
	e := dockertest.Need(t)
	compose := composeCommand(t)
	s := &stack{t: t, engine: e, network: "vgw-e2e-" + strings.TrimPrefix(e.Image, "vgw-test-fakevllm:")}
	s.project = strings.ReplaceAll(s.network, "-", "")
	image := buildVGWImage(t, e)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "sim.yaml") // the file docker-compose.sim.yaml's vgw reads
	// Registered first, so it runs last: once the model containers are
	// gone, the network can go.
	t.Cleanup(func() { s.compose(compose, "down", "-v", "--remove-orphans") })
	s.instance = e.Instance(t)
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(e2eConfig, e.Image, s.network, s.instance)), 0o644); err != nil {
		t.Fatal(err)
	}
	s.env = append(os.Environ(), "VGW_IMAGE="+image, "VGW_CONFIG_DIR="+dir, "VGW_NETWORK="+s.network,
		"VGW_ADMIN_BIND=127.0.0.1:", "VGW_HTTP_BIND=127.0.0.1:")
	if out, err := s.compose(compose, "up", "-d", "--no-build", "vgw"); err != nil {
		t.Fatalf("compose up: %v\n%s", err, out)
	}
	vgwID := s.vgwContainer(compose)
	addr := s.waitHealthy(vgwID)
	env := envoytest.Start(t, "../envoy/envoy.yaml", addr+":9002", addr+":18000")
	ctx := context.Background()

	ask := func(env *envoytest.Envoy, model string, stream bool) (int, string) {
		t.Helper()
		res, err := env.Ask(ctx, model, stream)
		if err != nil {
			t.Fatalf("%s: %v", model, err)
		}
		return res.Status, string(res.Body)
	}

	// Cold, then warm.
	start := time.Now()
	if code, body := ask(env, "a", false); code != 200 || !strings.Contains(body, `"model":"a"`) {
		t.Fatalf("cold request for a: %d %s\n%s", code, body, s.logs(compose))
	}
	cold := time.Since(start)
	aID := s.containerOf("a")
	start = time.Now()
	if code, _ := ask(env, "a", false); code != 200 {
		t.Fatalf("warm request for a: %d", code)
	}
	if warm := time.Since(start); warm > cold/2 {
		t.Errorf("the warm request took %v, the cold one %v", warm, cold)
	}
	if id := s.containerOf("a"); id != aID {
		t.Errorf("a's container changed from %s to %s", aID, id)
	}

	// Streamed: the server's SSE comes back whole.
	if code, body := ask(env, "a", true); code != 200 || !strings.Contains(body, "data: ") || !strings.Contains(body, "data: [DONE]") {
		t.Errorf("streamed request for a: %d %q", code, body)
	}

	// small admits one and queues one: a third at once is 429.
	if code, _ := ask(env, "small", false); code != 200 {
		t.Fatalf("small: %d", code)
	}
	codes := make([]int, 3)
	var wg sync.WaitGroup
	for i := range codes {
		wg.Go(func() { codes[i], _ = ask(env, "small", false) })
	}
	wg.Wait()
	if n := count(codes, 429); n == 0 || count(codes, 200) == 0 {
		t.Errorf("three at once for small, which takes one and queues one: %v", codes)
	}

	// b needs a's memory: a's container goes, b's comes.
	if code, _ := ask(env, "b", false); code != 200 {
		t.Fatalf("b: %d\n%s", code, s.logs(compose))
	}
	eventually(t, "a's container is removed", func() bool { return s.containerOf("a") == "" })
	bID, smallID := s.containerOf("b"), s.containerOf("small")
	if bID == "" || smallID == "" {
		t.Fatalf("b's container %q, small's %q", bID, smallID)
	}

	// vgw restarts with b and small running: it adopts both.
	if _, err := e.Client.ContainerRestart(ctx, vgwID, client.ContainerRestartOptions{}); err != nil {
		t.Fatal(err)
	}
	addr = s.waitHealthy(vgwID)
	env = envoytest.Start(t, "../envoy/envoy.yaml", addr+":9002", addr+":18000")
	for _, m := range []string{"b", "small"} {
		if code, _ := ask(env, m, false); code != 200 {
			t.Errorf("%s after the restart: %d\n%s", m, code, s.logs(compose))
		}
	}
	if id := s.containerOf("b"); id != bID {
		t.Errorf("b runs in %s after the restart, was %s: started twice", id, bID)
	}
	if id := s.containerOf("small"); id != smallID {
		t.Errorf("small runs in %s after the restart, was %s: started twice", id, smallID)
	}
	if logs := s.logs(compose); strings.Count(logs, `"msg":"model ready"`) < 2 || !strings.Contains(logs, "adopted") {
		t.Errorf("no adoption in the log:\n%s", logs)
	}

	// vgw is killed (SIGKILL: no shutdown at all) while c is loading, and
	// started again: b and small are adopted, c's container is adopted
	// still loading and becomes ready, nothing is started twice and no
	// labelled container is left untracked.
	loading, stopAsking := context.WithCancel(ctx)
	defer stopAsking()
	go env.Ask(loading, "c", false) // fails when vgw dies; only the load matters
	eventually(t, "c's container is starting", func() bool { return s.containerOf("c") != "" })
	cID := s.containerOf("c")
	if _, err := e.Client.ContainerKill(ctx, vgwID, client.ContainerKillOptions{Signal: "KILL"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "vgw is dead", func() bool {
		c, err := e.Client.ContainerInspect(ctx, vgwID, client.ContainerInspectOptions{})
		return err == nil && !c.Container.State.Running
	})
	stopAsking()
	if _, err := e.Client.ContainerStart(ctx, vgwID, client.ContainerStartOptions{}); err != nil {
		t.Fatal(err)
	}
	addr = s.waitHealthy(vgwID)
	env = envoytest.Start(t, "../envoy/envoy.yaml", addr+":9002", addr+":18000")
	for _, m := range []string{"c", "b", "small"} {
		if code, _ := ask(env, m, false); code != 200 {
			t.Errorf("%s after vgw was killed: %d\n%s", m, code, s.logs(compose))
		}
	}
	for m, id := range map[string]string{"b": bID, "small": smallID, "c": cID} {
		if now := s.containerOf(m); now != id {
			t.Errorf("%s runs in %s after vgw was killed, was %s: started twice", m, now, id)
		}
	}
	all, err := e.Client.ContainerList(ctx, client.ContainerListOptions{All: true,
		Filters: make(client.Filters).Add("label", "vgw.instance="+s.instance)})
	if err != nil {
		t.Fatal(err)
	}
	if len(all.Items) != 3 {
		var names []string
		for _, c := range all.Items {
			names = append(names, c.Labels["vgw.model"]+":"+string(c.State))
		}
		t.Errorf("labelled containers after vgw was killed: %v; want b, small and c, once each", names)
	}
}

func count(xs []int, v int) int {
	n := 0
	for _, x := range xs {
		if x == v {
			n++
		}
	}
	return n
}

// composeCommand is `docker compose` where the plugin exists, else the
// standalone docker-compose.
func composeCommand(t *testing.T) []string {
	if exec.Command("docker", "compose", "version").Run() == nil {
		return []string{"docker", "compose"}
	}
	if p, err := exec.LookPath("docker-compose"); err == nil {
		return []string{p}
	}
	t.Fatal("neither `docker compose` nor docker-compose is installed")
	return nil
}

func (s *stack) compose(compose []string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	full := append(append(compose[1:len(compose):len(compose)], "-f", "../docker-compose.sim.yaml", "-p", s.project), args...)
	cmd := exec.CommandContext(ctx, compose[0], full...)
	cmd.Env = s.env
	return cmd.CombinedOutput()
}

// vgwContainer is the ID of the compose project's vgw container.
func (s *stack) vgwContainer(compose []string) string {
	out, err := s.compose(compose, "ps", "-q", "vgw")
	id := strings.TrimSpace(string(out))
	if err != nil || id == "" {
		s.t.Fatalf("compose ps: %v %s", err, out)
	}
	return id
}

// waitHealthy waits for Docker to call the vgw container healthy (its
// health check runs `vgw health`), and returns its address on the network.
func (s *stack) waitHealthy(id string) string {
	s.t.Helper()
	var addr string
	deadline := time.Now().Add(90 * time.Second)
	for {
		res, err := s.engine.Client.ContainerInspect(context.Background(), id, client.ContainerInspectOptions{})
		if err != nil {
			s.t.Fatal(err)
		}
		c := res.Container
		if c.State.Health != nil && c.State.Health.Status == container.Healthy {
			if ep := c.NetworkSettings.Networks[s.network]; ep != nil {
				addr = ep.IPAddress.String()
			}
			break
		}
		if !c.State.Running && !c.State.Restarting {
			s.t.Fatalf("vgw's container stopped: %+v", c.State)
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("vgw's container is not healthy: %+v", c.State.Health)
		}
		time.Sleep(100 * time.Millisecond) // polling interval
	}
	if addr == "" {
		s.t.Fatalf("vgw's container has no address on %s", s.network)
	}
	return addr
}

// containerOf is the running container of model, or "".
func (s *stack) containerOf(model string) string {
	list, err := s.engine.Client.ContainerList(context.Background(), client.ContainerListOptions{
		Filters: make(client.Filters).Add("label", "vgw.instance="+s.instance, "vgw.model="+model)})
	if err != nil {
		s.t.Fatal(err)
	}
	for _, c := range list.Items {
		if c.State == container.StateRunning {
			return c.ID
		}
	}
	return ""
}

func (s *stack) logs(compose []string) string {
	out, _ := s.compose(compose, "logs", "--no-color", "vgw")
	return string(out)
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond) // polling interval
	}
}

// buildVGWImage builds vgw (with cgo, as released) and puts it in an image
// with the libraries it links, found with ldd: the host's own, so no base
// image is needed.
func buildVGWImage(t *testing.T, e *dockertest.Engine) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	bin := filepath.Join(dir, "vgw")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/vgw-project/vgw/cmd/vgw")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1", "CGO_CFLAGS=-O2 -g -Wno-deprecated-declarations")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build vgw: %v\n%s", err, out)
	}
	files := map[string]string{"/vgw": bin}
	out, err := exec.CommandContext(ctx, "ldd", bin).Output()
	if err != nil {
		t.Fatalf("ldd vgw: %v", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		// "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
		for _, f := range strings.Fields(sc.Text()) {
			if strings.HasPrefix(f, "/") {
				files[f] = f
			}
		}
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(name string, mode int64, data []byte) {
		tw.WriteHeader(&tar.Header{Name: name, Mode: mode, Size: int64(len(data))})
		tw.Write(data)
	}
	var copies []string
	for inImage, onHost := range files {
		data, err := os.ReadFile(onHost) // follows links: the file itself
		if err != nil {
			t.Fatal(err)
		}
		add("rootfs"+inImage, 0o755, data)
		copies = append(copies, inImage)
	}
	add("Dockerfile", 0o644, []byte("FROM scratch\nCOPY rootfs/ /\nENTRYPOINT [\"/vgw\"]\n"))
	tw.Close()
	image := "vgw-e2e:" + strings.TrimPrefix(e.Image, "vgw-test-fakevllm:")
	res, err := e.Client.ImageBuild(ctx, &buf, client.ImageBuildOptions{Tags: []string{image},
		Labels: map[string]string{dockertest.LabelTest: "true"}, Remove: true, ForceRemove: true})
	if err != nil {
		t.Fatalf("build image %s (%v): %v", image, copies, err)
	}
	defer res.Body.Close()
	dec := json.NewDecoder(res.Body)
	for {
		var m struct{ Error string }
		if dec.Decode(&m) != nil {
			break
		}
		if m.Error != "" {
			t.Fatalf("build image %s: %s", image, m.Error)
		}
	}
	t.Cleanup(func() {
		e.Client.ImageRemove(context.Background(), image, client.ImageRemoveOptions{Force: true, PruneChildren: true})
	})
	return image
}
