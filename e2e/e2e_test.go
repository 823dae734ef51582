// Package e2e runs the deployment as users run it, on the real Docker
// engine: docker-compose.sim.yaml's vgw service as a container with the
// Docker socket and declared GPUs, in the host's network namespace,
// starting fake vLLM containers on the models' own network; Envoy is
// played by envoy/envoytest against vgw's ext_proc and xDS addresses on
// the host's loopback, its router sending the HTTP to the endpoints xDS
// names. No image can be pulled, so vgw's image is built from the binary
// and the libraries it links (not from the Dockerfile), and the fake's
// FROM scratch.
package e2e

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"sigs.k8s.io/yaml"

	"github.com/vgw-project/vgw/envoy/envoytest"
	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager/runtime/docker/dockertest"
	adminv1 "github.com/vgw-project/vgw/proto/adminv1"
)

func TestMain(m *testing.M) {
	code := m.Run()
	dockertest.Cleanup()
	os.Exit(code)
}

const e2eConfig = `log_format: json
load_timeout: 2m
drain_timeout: 5s
min_resident: 0s
runtime: {kind: docker, image: %s, network: %s, instance: %s}
gpus: [{name: sim0, memory: 80GiB}]
models:
  a: {repo: org/a, vram: 50GiB, env: {FAKEVLLM_STARTUP_DELAY: 200ms}}
  b: {repo: org/b, vram: 50GiB}
  small: {repo: org/small, vram: 10GiB, max_concurrent: 1, max_queue: 1, queue_timeout: 5m, env: {FAKEVLLM_TOKENS_PER_SECOND: "5"}}
  c: {repo: org/c, vram: 10GiB, env: {FAKEVLLM_READY_ON_SIGNAL: USR1}}
`

// stack is the compose project under test.
type stack struct {
	t        *testing.T
	engine   *dockertest.Engine
	project  string
	env      []string
	instance string
	network  string
	addrs    map[string]string // vgw's listeners on the host, by VGW_*_ADDR name
}

// freeAddr is a loopback address no one listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestComposeSim brings up the sim stack's vgw and drives it as Envoy
// would: a cold start, a warm request, a streamed one, a queue overflowing
// into 429, a swap when memory runs out, and `docker restart` of vgw with
// models running (adopted: the same containers, nothing started twice).
// On the way it checks what the stack exposes: the admin service wants
// its token, and a model container can reach none of vgw's listeners.
func TestComposeSim(t *testing.T) {
	e := dockertest.Need(t)
	compose := composeCommand(t)
	// The models' network is the test engine's own (make sim-up creates
	// the stack's); vgw runs in the host's network namespace.
	s := &stack{t: t, engine: e, network: e.Network}
	s.project = "vgwe2e" + strings.TrimPrefix(e.Image, "vgw-test-fakevllm:")
	image := buildVGWImage(t, e)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "sim.yaml") // the file docker-compose.sim.yaml's vgw reads
	t.Cleanup(func() { s.compose(compose, "down", "-v", "--remove-orphans") })
	s.instance = e.Instance(t)
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(e2eConfig, e.Image, s.network, s.instance)), 0o644); err != nil {
		t.Fatal(err)
	}
	token := filepath.Join(t.TempDir(), "admin-token")
	if err := os.WriteFile(token, []byte("e2e-admin-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s.addrs = map[string]string{}
	s.env = append(os.Environ(), "VGW_IMAGE="+image, "VGW_CONFIG_DIR="+dir, "VGW_ADMIN_TOKEN_FILE="+token)
	for _, k := range []string{"VGW_EXTPROC_ADDR", "VGW_XDS_ADDR", "VGW_ADMIN_ADDR", "VGW_HTTP_ADDR"} {
		s.addrs[k] = freeAddr(t)
		s.env = append(s.env, k+"="+s.addrs[k])
	}
	if out, err := s.compose(compose, "up", "-d", "--no-build", "vgw"); err != nil {
		t.Fatalf("compose up: %v\n%s", err, out)
	}
	vgwID := s.vgwContainer(compose)
	s.waitHealthy(vgwID)
	s.adminNeedsToken("e2e-admin-token")
	startEnvoy := func() *envoytest.Envoy {
		return envoytest.Start(t, "../envoy/envoy.yaml", s.addrs["VGW_EXTPROC_ADDR"], s.addrs["VGW_XDS_ADDR"])
	}
	// held, when set, holds the next request on its way to its model's
	// server until the test lets it go, as a long generation would hold
	// it.
	var held atomic.Pointer[gate]
	holding := func(ctx context.Context, _ *extproctest.Forwarded) error {
		g := held.Swap(nil)
		if g == nil {
			return nil
		}
		close(g.entered)
		select {
		case <-g.release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	env := startEnvoy()
	env.BeforeUpstream = holding
	ctx := context.Background()

	ask := func(env *envoytest.Envoy, model string, stream bool) (int, string) {
		t.Helper()
		res, err := env.Ask(ctx, model, stream)
		if err != nil {
			t.Fatalf("%s: %v", model, err)
		}
		return res.Status, string(res.Body)
	}

	// Cold, then warm: the same container, and no second load.
	if code, body := ask(env, "a", false); code != 200 || !strings.Contains(body, `"model":"a"`) {
		t.Fatalf("cold request for a: %d %s\n%s", code, body, s.logs(compose))
	}
	aID := s.containerOf("a")
	if code, _ := ask(env, "a", false); code != 200 {
		t.Fatalf("warm request for a: %d", code)
	}
	if id := s.containerOf("a"); id != aID {
		t.Errorf("a's container changed from %s to %s", aID, id)
	}
	if n := s.metric("vgw_model_events_total", `kind="load_started"`, `model="a"`); n != 1 {
		t.Errorf("a was loaded %v times for a cold and a warm request, want once", n)
	}

	// A model's container can reach none of vgw's listeners, wherever it
	// looks for them; it does reach its network (another model's server).
	s.isolated(vgwID, aID)

	// Streamed: the server's SSE comes back whole.
	if code, body := ask(env, "a", true); code != 200 || !strings.Contains(body, "data: ") || !strings.Contains(body, "data: [DONE]") {
		t.Errorf("streamed request for a: %d %q", code, body)
	}

	// small admits one and queues one: a third meanwhile is 429. The
	// first is held on its way to small's server until the third is
	// answered, so the three overlap however slowly they are sent.
	if code, _ := ask(env, "small", false); code != 200 {
		t.Fatalf("small: %d", code)
	}
	g := &gate{entered: make(chan struct{}), release: make(chan struct{})}
	held.Store(g)
	first := askLater(env, "small")
	select {
	case <-g.entered:
	case <-time.After(long):
		t.Fatal("the first request for small never left for its server")
	}
	second := askLater(env, "small")
	poll.Until(t, "the second request for small is queued", func() bool { return s.metric("vgw_queue_depth", `model="small"`) == 1 })
	select {
	case r := <-askLater(env, "small"):
		if r.err != nil || r.code != 429 {
			t.Errorf("a third request for small, which takes one and queues one: %d %v", r.code, r.err)
		}
	case <-time.After(long):
		t.Error("a third request for small, which takes one and queues one, waited")
	}
	close(g.release)
	for i, r := range []askResult{<-first, <-second} {
		if r.err != nil || r.code != 200 {
			t.Errorf("request %d for small, admitted or queued: %d %v", i+1, r.code, r.err)
		}
	}

	// b needs a's memory: a's container goes, b's comes.
	if code, _ := ask(env, "b", false); code != 200 {
		t.Fatalf("b: %d\n%s", code, s.logs(compose))
	}
	poll.Until(t, "a's container is removed", func() bool { return s.containerOf("a") == "" })
	bID, smallID := s.containerOf("b"), s.containerOf("small")
	if bID == "" || smallID == "" {
		t.Fatalf("b's container %q, small's %q", bID, smallID)
	}

	// vgw restarts with b and small running: it adopts both.
	if _, err := e.Client.ContainerRestart(ctx, vgwID, client.ContainerRestartOptions{}); err != nil {
		t.Fatal(err)
	}
	s.waitHealthy(vgwID)
	env = startEnvoy()
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
	poll.Until(t, "c's container is starting", func() bool { return s.containerOf("c") != "" })
	cID := s.containerOf("c")
	if _, err := e.Client.ContainerKill(ctx, vgwID, client.ContainerKillOptions{Signal: "KILL"}); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "vgw is dead", func() bool {
		c, err := e.Client.ContainerInspect(ctx, vgwID, client.ContainerInspectOptions{})
		return err == nil && !c.Container.State.Running
	})
	stopAsking()
	if _, err := e.Client.ContainerStart(ctx, vgwID, client.ContainerStartOptions{}); err != nil {
		t.Fatal(err)
	}
	s.waitHealthy(vgwID)
	env = startEnvoy()
	s.readyNow(cID) // adopted while it loads, and then ready
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

// gate holds a request on its way to its model's server: entered is
// closed once it got there, and closing release lets it go.
type gate struct{ entered, release chan struct{} }

type askResult struct {
	code int
	err  error
}

// askLater sends a request for model and answers how it ended.
func askLater(env *envoytest.Envoy, model string) <-chan askResult {
	out := make(chan askResult, 1)
	go func() {
		res, err := env.Ask(context.Background(), model, false)
		if err != nil {
			out <- askResult{err: err}
			return
		}
		out <- askResult{code: res.Status}
	}()
	return out
}

// metric is the value of vgw's metric name whose labels include labels
// (each `key="value"`), read from its /metrics; -1 when there is none.
func (s *stack) metric(name string, labels ...string) float64 {
	s.t.Helper()
	resp, err := http.Get("http://" + s.addrs["VGW_HTTP_ADDR"] + "/metrics")
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
lines:
	for sc.Scan() {
		series, value, ok := strings.Cut(sc.Text(), " ")
		if !ok || !strings.HasPrefix(series, name+"{") {
			continue
		}
		for _, l := range labels {
			if !strings.Contains(series, l) {
				continue lines
			}
		}
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			s.t.Fatalf("%s: %v", sc.Text(), err)
		}
		return v
	}
	return -1
}

// readyNow ends the load of a model container whose fake waits for
// SIGUSR1 (FAKEVLLM_READY_ON_SIGNAL), once its /health answers: the fake
// catches the signal before it listens, so the signal cannot come too
// early.
func (s *stack) readyNow(id string) {
	t := s.t
	t.Helper()
	res, err := s.engine.Client.ContainerInspect(context.Background(), id, client.ContainerInspectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ep := res.Container.NetworkSettings.Networks[s.network]
	if ep == nil {
		t.Fatalf("the model container %s is not on %s", id, s.network)
	}
	url := "http://" + net.JoinHostPort(ep.IPAddress.String(), "8000") + "/health"
	poll.Until(t, "the model container answers", func() bool {
		c := http.Client{Timeout: 5 * time.Second} // then ask again
		resp, err := c.Get(url)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return true
	})
	if _, err := s.engine.Client.ContainerKill(context.Background(), id, client.ContainerKillOptions{Signal: "SIGUSR1"}); err != nil {
		t.Fatal(err)
	}
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
// health check runs `vgw health`).
func (s *stack) waitHealthy(id string) {
	s.t.Helper()
	deadline := time.Now().Add(long)
	for {
		res, err := s.engine.Client.ContainerInspect(context.Background(), id, client.ContainerInspectOptions{})
		if err != nil {
			s.t.Fatal(err)
		}
		c := res.Container
		if c.State.Health != nil && c.State.Health.Status == container.Healthy {
			return
		}
		if !c.State.Running && !c.State.Restarting {
			s.t.Fatalf("vgw's container stopped: %+v", c.State)
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("vgw's container is not healthy: %+v", c.State.Health)
		}
		time.Sleep(100 * time.Millisecond) // polling interval
	}
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

// long bounds a wait for what must happen: only a hang reaches it, however
// slow the machine.
const long = 2 * time.Minute

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
	return buildImage(t, e, "vgw-e2e:"+strings.TrimPrefix(e.Image, "vgw-test-fakevllm:"), files, "/vgw")
}

// buildImage builds an image FROM scratch holding files (path in the image
// → path here) with entrypoint, removed when the test ends.
func buildImage(t *testing.T, e *dockertest.Engine, image string, files map[string]string, entrypoint string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
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
	add("Dockerfile", 0o644, []byte(fmt.Sprintf("FROM scratch\nCOPY rootfs/ /\nENTRYPOINT [%q]\n", entrypoint)))
	tw.Close()
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

// adminNeedsToken checks that the compose stack's admin service refuses
// a call without the token and answers one with it.
func (s *stack) adminNeedsToken(token string) {
	t := s.t
	t.Helper()
	conn, err := grpc.NewClient(s.addrs["VGW_ADMIN_ADDR"], grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), long)
	defer cancel()
	admin := adminv1.NewAdminClient(conn)
	if _, err := admin.ListModels(ctx, &adminv1.ListModelsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("the admin service without the token: %v, want Unauthenticated", err)
	}
	withToken := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	if _, err := admin.ListModels(withToken, &adminv1.ListModelsRequest{}); err != nil {
		t.Fatalf("the admin service with the token: %v", err)
	}
}

// isolated checks, from a container on the models' network, that a TCP
// connection to any of vgw's listeners fails at every address of this
// host (the network's gateway among them) and of vgw's container (none,
// in the host's network namespace; its address on the models' network
// when it shared it, as it did), while one to the model container other
// opens, so that the probe itself is known to work.
func (s *stack) isolated(vgw, other string) {
	t := s.t
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	bin := filepath.Join(dir, "dial")
	cmd := exec.Command("go", "build", "-o", bin, "./testdata/dial")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build dial: %v\n%s", err, out)
	}
	image := buildImage(t, s.engine, "vgw-e2e-dial:"+strings.TrimPrefix(s.engine.Image, "vgw-test-fakevllm:"), map[string]string{"/dial": bin}, "/dial")

	var hosts []string
	ifaddrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range ifaddrs {
		if ip, ok := a.(*net.IPNet); ok && ip.IP.To4() != nil && !ip.IP.IsLoopback() {
			hosts = append(hosts, ip.IP.String())
		}
	}
	if res, err := s.engine.Client.ContainerInspect(ctx, vgw, client.ContainerInspectOptions{}); err == nil && res.Container.NetworkSettings != nil {
		for _, ep := range res.Container.NetworkSettings.Networks {
			if ep.IPAddress.IsValid() {
				hosts = append(hosts, ep.IPAddress.String())
			}
		}
	}
	var closed []string
	for _, k := range []string{"VGW_EXTPROC_ADDR", "VGW_XDS_ADDR", "VGW_ADMIN_ADDR", "VGW_HTTP_ADDR"} {
		_, port, _ := net.SplitHostPort(s.addrs[k])
		for _, h := range hosts {
			closed = append(closed, net.JoinHostPort(h, port))
		}
	}
	res, err := s.engine.Client.ContainerInspect(ctx, other, client.ContainerInspectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ep := res.Container.NetworkSettings.Networks[s.network]
	if ep == nil {
		t.Fatalf("the model container %s is not on %s", other, s.network)
	}
	open := net.JoinHostPort(ep.IPAddress.String(), "8000")

	created, err := s.engine.Client.ContainerCreate(ctx, client.ContainerCreateOptions{
		Config:           &container.Config{Image: image, Cmd: append([]string{open}, closed...), Tty: true, Labels: map[string]string{dockertest.LabelTest: "true"}},
		HostConfig:       &container.HostConfig{},
		NetworkingConfig: &network.NetworkingConfig{EndpointsConfig: map[string]*network.EndpointSettings{s.network: {}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.engine.Client.ContainerRemove(ctx, created.ID, client.ContainerRemoveOptions{Force: true})
	if _, err := s.engine.Client.ContainerStart(ctx, created.ID, client.ContainerStartOptions{}); err != nil {
		t.Fatal(err)
	}
	wait := s.engine.Client.ContainerWait(ctx, created.ID, client.ContainerWaitOptions{Condition: container.WaitConditionNotRunning})
	select {
	case <-wait.Result:
	case err := <-wait.Error:
		t.Fatal(err)
	}
	logs, err := s.engine.Client.ContainerLogs(ctx, created.ID, client.ContainerLogsOptions{ShowStdout: true})
	if err != nil {
		t.Fatal(err)
	}
	defer logs.Close()
	out, _ := io.ReadAll(logs)
	report := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(strings.ReplaceAll(string(out), "\r", "")), "\n") {
		addr, verdict, _ := strings.Cut(line, " ")
		report[addr] = verdict
	}
	if report[open] != "open" {
		t.Fatalf("the probe could not reach the model server at %s (%q): it proves nothing\n%s", open, report[open], out)
	}
	for _, a := range closed {
		if v := report[a]; !strings.HasPrefix(v, "closed") {
			t.Errorf("a model container reaches vgw at %s: %q", a, v)
		}
	}
	t.Logf("from the models' network: %s open; %d addresses of vgw's listeners closed", open, len(closed))
}

// TestComposeDefaults: what the shipped compose files do with nothing
// set, as `make up` runs them: Envoy and vgw in the host's network
// namespace, every vgw listener on the host's loopback, the admin service
// behind its token file, and no port published (on the host network
// there is nothing to publish). TestComposeSim sets its own addresses, so
// this is what proves the defaults keep the model containers out.
func TestComposeDefaults(t *testing.T) {
	compose := composeCommand(t)
	for _, file := range []string{"../docker-compose.yaml", "../docker-compose.sim.yaml"} {
		t.Run(filepath.Base(file), func(t *testing.T) {
			var env []string
			for _, kv := range os.Environ() {
				if !strings.HasPrefix(kv, "VGW_") {
					env = append(env, kv)
				}
			}
			cmd := exec.Command(compose[0], append(compose[1:len(compose):len(compose)], "-f", file, "-p", "vgwdefaults", "config")...)
			cmd.Env = env
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("compose config: %v", err)
			}
			var c struct {
				Services map[string]struct {
					NetworkMode string            `json:"network_mode"`
					Environment map[string]string `json:"environment"`
					Command     []string          `json:"command"`
					Ports       []any             `json:"ports"`
					Networks    any               `json:"networks"`
				} `json:"services"`
			}
			if err := yaml.Unmarshal(out, &c); err != nil {
				t.Fatal(err)
			}
			for _, name := range []string{"envoy", "vgw"} {
				s := c.Services[name]
				if s.NetworkMode != "host" || len(s.Ports) > 0 || s.Networks != nil {
					t.Errorf("%s: network_mode %q, ports %v, networks %v; want the host's network and nothing published", name, s.NetworkMode, s.Ports, s.Networks)
				}
			}
			vgw := c.Services["vgw"]
			for _, k := range []string{"VGW_EXTPROC_ADDR", "VGW_XDS_ADDR", "VGW_ADMIN_ADDR", "VGW_HTTP_ADDR"} {
				if !strings.HasPrefix(vgw.Environment[k], "127.0.0.1:") {
					t.Errorf("%s is %q, want the host's loopback", k, vgw.Environment[k])
				}
			}
			if !slices.Contains(vgw.Command, "--admin-token-file") {
				t.Errorf("vgw runs %v, without the admin token", vgw.Command)
			}
		})
	}
}
