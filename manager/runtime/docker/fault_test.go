package docker_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"

	"github.com/vgw-project/vgw/internal/poll"
	"github.com/vgw-project/vgw/manager"
	"github.com/vgw-project/vgw/manager/gpu"
	"github.com/vgw-project/vgw/manager/managertest"
	"github.com/vgw-project/vgw/manager/runtime/docker"
	"github.com/vgw-project/vgw/manager/runtime/docker/dockertest"
)

// Faults around the Docker runtime, on the real engine: the engine out of
// reach for a while, and vgw killed with models running.

// faultConfig has room for all its models on one GPU at once, so that
// nothing is evicted: every container that goes, goes for the fault.
const faultConfig = `
runtime: {kind: docker, image: %s, network: %s, instance: %s}
load_timeout: 1m
drain_timeout: 1s
min_resident: 0s
inactivity_timeout: 0s
gpus: [{name: g0, memory: 80GiB}]
models:
  a: {repo: org/a, vram: 15GiB}
  b: {repo: org/b, vram: 15GiB}
  c: {repo: org/c, vram: 15GiB}
  d: {repo: org/d, vram: 15GiB}
  warming: {repo: org/warming, vram: 15GiB, env: {FAKEVLLM_READY_ON_SIGNAL: USR1}}
`

// TestDockerOutage: Docker's engine goes out of vgw's reach with models
// loaded, and comes back. Meanwhile what is loaded serves on (vgw's state
// and the containers need no engine), a load fails saying the engine is
// unreachable, an unload is queued, and a container dies unseen. Once the
// engine is back, vgw reconnects and catches up: the dead container's
// model is stopped, the queued unloads are carried out (a model loaded
// again before the event stream reconnected keeps its new container),
// and loads work again; nothing is started more often than asked.
func TestDockerOutage(t *testing.T) {
	e := dockertest.Need(t)
	instance := e.Instance(t)
	began := time.Now()
	proxy := newDockerProxy(t, e)
	rtLog := &managertest.LogRecorder{}
	dm := startDockerManagerAt(t, fmt.Sprintf(faultConfig, e.Image, e.Network, instance), docker.Options{Instance: instance, Host: proxy.host(), Log: slog.New(rtLog)})
	for _, m := range []string{"a", "c", "d"} {
		if err := dm.ensure(t, m); err != nil {
			t.Fatal(err)
		}
	}
	addr := dm.status("a").Endpoint
	a, _ := dm.container(t, "a")
	d, _ := dm.container(t, "d")

	proxy.cut()

	// What is loaded serves on: the manager answers from its own state
	// and requests go to the container, not through Docker.
	if st := dm.status("a"); st.State != manager.Ready || st.Instance != a.ID {
		t.Errorf("a is %v on %s with the engine out of reach, want ready on %s", st.State, st.Instance, a.ID)
	}
	if err := dm.ensure(t, "a"); err != nil {
		t.Errorf("a request for a: %v", err)
	}
	if code := managertest.Chat(addr, "a"); code != http.StatusOK {
		t.Errorf("a's server answered %d with the engine out of reach", code)
	}

	// A load fails at once, and says why and what to check.
	ctx, cancel := context.WithTimeout(context.Background(), poll.Long)
	defer cancel()
	err := dm.Load(ctx, "b", true)
	if !errors.Is(err, docker.ErrUnreachable) || !strings.Contains(err.Error(), "is dockerd running") {
		t.Errorf("loading b with the engine out of reach: %v; want %v with the hint", err, docker.ErrUnreachable)
	}
	if _, ok := dm.container(t, "b"); ok {
		t.Error("b has a container though its load failed")
	}

	// Unloads cannot reach the engine: the models stop in vgw's eyes, and
	// their containers run on until the engine is back.
	for _, m := range []string{"c", "d"} {
		if err := dm.Unload(m); err != nil {
			t.Fatal(err)
		}
		poll.Until(t, m+" is stopped", func() bool { return dm.status(m).State == manager.Stopped })
		if c, ok := dm.container(t, m); !ok || !c.State.Running {
			t.Fatalf("%s's container stopped though the engine was out of vgw's reach", m)
		}
	}

	// A crash vgw cannot see: it still takes a for ready.
	if _, err := e.Client.ContainerKill(context.Background(), a.ID, client.ContainerKillOptions{Signal: "SIGKILL"}); err != nil {
		t.Fatal(err)
	}
	if st := dm.status("a"); st.State != manager.Ready {
		t.Errorf("a is %v: vgw saw a crash with no way to", st.State)
	}

	// The engine comes back while the event stream waits out a backoff of
	// over a second: time for a load to get in first.
	var reconnect time.Time // when the stream tries again
	poll.Until(t, "the event stream to back off for 1.6s or more", func() bool {
		for _, r := range rtLog.Records() {
			if in, _ := managertest.Attr(r, "in").(time.Duration); r.Level == slog.LevelWarn && in >= 1600*time.Millisecond {
				reconnect = r.Time.Add(in)
				return true
			}
		}
		return false
	})
	proxy.restore(t)
	restored := time.Now()

	// d, asked for again before vgw reconnects, gets a new container: the
	// old one's removal was asked for, and the removal queued for the
	// reconnect must not take the new one with it.
	if err := dm.Load(ctx, "d", true); err != nil {
		t.Fatalf("d, with the engine back: %v", err)
	}
	if loaded := time.Now(); loaded.After(reconnect) {
		// The reconnect may have removed the old container first, and then
		// what follows cannot tell the fix from its absence.
		t.Logf("d loaded %v after the event stream reconnected: the queued removal was not raced", loaded.Sub(reconnect))
	}
	d2, _ := dm.container(t, "d")
	if d2.ID == d.ID {
		t.Errorf("d was loaded again into the container whose removal is queued")
	}

	poll.Until(t, "a's crash is noticed", func() bool { _, ok := dm.events.find("a", manager.EventCrashed); return ok })
	crash, _ := dm.events.find("a", manager.EventCrashed)
	if !strings.Contains(crash.Detail, "SIGKILL") {
		t.Errorf("a's crash detail %q", crash.Detail)
	}
	if st := dm.status("a"); st.State != manager.Stopped {
		t.Errorf("a is %v after its crash", st.State)
	}
	if addr := dm.status("a").Endpoint; addr != "" {
		t.Errorf("a crashed model still has an endpoint %s", addr)
	}
	poll.Until(t, "c's container is removed", func() bool { _, ok := dm.container(t, "c"); return !ok })
	caughtUp := time.Now()
	t.Logf("the engine back at 0: the event stream reconnects at %v (its backoff), a's crash is noticed at %v, c's queued removal is done by %v",
		reconnect.Sub(restored).Round(time.Millisecond), crash.Time.Sub(restored).Round(time.Millisecond), caughtUp.Sub(restored).Round(time.Millisecond))
	poll.Until(t, "no removal is queued", func() bool { return dm.rt.Unremoved() == 0 })
	if st := dm.status("d"); st.State != manager.Ready || st.Instance != d2.ID {
		t.Errorf("d is %v on %q, want ready on %s", st.State, st.Instance, d2.ID)
	}
	if c, ok := dm.container(t, "d"); !ok || c.ID != d2.ID || !c.State.Running {
		t.Error("d's new container went with the old one's queued removal")
	}
	if _, err := e.Client.ContainerInspect(context.Background(), d.ID, client.ContainerInspectOptions{}); !docker.ContainerGone(err) {
		t.Errorf("d's old container: %v; want it removed", err)
	}

	if err := dm.Load(ctx, "b", true); err != nil {
		t.Fatalf("b, with the engine back: %v", err)
	}
	b, _ := dm.container(t, "b")
	if addr := dm.status("b").Endpoint; managertest.Chat(addr, "b") != http.StatusOK || !b.State.Running {
		t.Errorf("b at %s does not serve", addr)
	}
	// d twice, both asked for: before its unload and after.
	if got, want := containerStarts(t, e, instance, began), map[string]int{"a": 1, "b": 1, "c": 1, "d": 2}; !maps.Equal(got, want) {
		t.Errorf("containers started by model %v, want %v", got, want)
	}
}

// TestDockerKilled: vgw killed (SIGKILL) with one model ready and one
// still loading, then started again, takes both containers over as they
// are: the loading one (its fake waits for SIGUSR1, so it is loading
// until the test says) becomes ready, nothing is started again, every
// container of its instance is a model's, and a container not its own is
// left alone.
func TestDockerKilled(t *testing.T) {
	e := dockertest.Need(t)
	instance := e.Instance(t)
	began := time.Now()
	yaml := fmt.Sprintf(faultConfig, e.Image, e.Network, instance)
	proxy := newDockerProxy(t, e)
	first := startDockerManagerAt(t, yaml, docker.Options{Instance: instance, Host: proxy.host()})
	if err := first.ensure(t, "a"); err != nil {
		t.Fatal(err)
	}
	if err := first.Load(context.Background(), "warming", false); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "warming's container runs, still loading", func() bool {
		c, ok := first.container(t, "warming")
		st := first.status("warming")
		return ok && c.State.Running && st.State == manager.Loading && st.Instance == c.ID
	})
	a, _ := first.container(t, "a")
	warming, _ := first.container(t, "warming")

	// The kill. vgw has no shutdown of its own to skip (Run just returns),
	// so what a SIGKILL changes is that nothing the first vgw had under
	// way reaches Docker afterwards: its connections go first, as the
	// kernel closes a killed process's sockets, and only then do its
	// goroutines end.
	proxy.cut()
	first.stop()

	unlabelled, err := e.Client.ContainerCreate(context.Background(), client.ContainerCreateOptions{
		Config: &container.Config{Image: e.Image, Cmd: []string{"--model", "theirs"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		e.Client.ContainerRemove(context.Background(), unlabelled.ID, client.ContainerRemoveOptions{Force: true})
	})
	if _, err := e.Client.ContainerStart(context.Background(), unlabelled.ID, client.ContainerStartOptions{}); err != nil {
		t.Fatal(err)
	}

	second := startDockerManagerAt(t, yaml, docker.Options{Instance: instance})
	// The View shows what the new manager adopted once its loop runs.
	poll.Until(t, "warming is adopted", func() bool { return second.status("warming").State != manager.Stopped })
	if st := second.status("warming"); st.State != manager.Loading || st.Instance != warming.ID {
		t.Fatalf("warming is %v in %q right after the restart, want adopted loading in %s", st.State, st.Instance, warming.ID)
	}
	second.readyNow(t, "warming")
	poll.Until(t, "a and warming are ready", func() bool {
		return second.status("a").State == manager.Ready && second.status("warming").State == manager.Ready
	})
	for _, m := range []struct {
		name string
		was  container.InspectResponse
	}{{"a", a}, {"warming", warming}} {
		if st := second.status(m.name); st.Instance != m.was.ID {
			t.Errorf("%s runs in %s after the restart, was %s", m.name, st.Instance, m.was.ID)
		}
		// The View shows a ready model before its ready event is told.
		poll.Until(t, m.name+"'s ready event is told", func() bool { _, ok := second.events.find(m.name, manager.EventReady); return ok })
		if ev, _ := second.events.find(m.name, manager.EventReady); !strings.Contains(ev.Detail, "adopted") {
			t.Errorf("%s's ready event %+v, want it adopted", m.name, ev)
		}
	}
	if addr := second.status("warming").Endpoint; managertest.Chat(addr, "warming") != http.StatusOK {
		t.Errorf("warming at %s does not serve", addr)
	}

	// Every container of the instance is a ready model's.
	list, err := e.Client.ContainerList(context.Background(), client.ContainerListOptions{All: true,
		Filters: make(client.Filters).Add("label", docker.LabelInstance+"="+instance)})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Items) != 2 {
		t.Errorf("%d containers of the instance, want a's and warming's", len(list.Items))
	}
	for _, c := range list.Items {
		if st := second.status(c.Labels[docker.LabelModel]); st.Instance != c.ID || st.State != manager.Ready {
			t.Errorf("container %s (%s, %s) is no ready model's: an orphan", c.ID, c.Labels[docker.LabelModel], c.State)
		}
	}
	if got, want := containerStarts(t, e, instance, began), map[string]int{"a": 1, "warming": 1}; !maps.Equal(got, want) {
		t.Errorf("containers started by model %v, want %v", got, want)
	}
	if c, err := e.Client.ContainerInspect(context.Background(), unlabelled.ID, client.ContainerInspectOptions{}); err != nil || !c.Container.State.Running {
		t.Errorf("the unlabelled container was touched: %v", err)
	}
}

// startDockerManagerAt runs a manager on the Docker runtime configured by
// yaml and opts (its image and network from yaml; its host "" for
// Docker's environment, its log nil for none).
func startDockerManagerAt(t *testing.T, yaml string, opts docker.Options) *dockerManager {
	t.Helper()
	return startDockerManagerWrapped(t, yaml, opts, nil)
}

// startDockerManagerWrapped is startDockerManagerAt with the manager's
// runtime wrapped, when wrap is set (dm.rt stays the Docker runtime).
func startDockerManagerWrapped(t *testing.T, yaml string, opts docker.Options, wrap func(manager.Runtime) manager.Runtime) *dockerManager {
	t.Helper()
	e := dockertest.Need(t)
	cfg := managertest.Config(t, yaml)
	opts.Image, opts.Network = cfg.Runtime.Image, cfg.Runtime.Network
	rt, err := docker.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	var gs []gpu.GPU
	for _, g := range cfg.GPUs.Declared {
		gs = append(gs, gpu.GPU{Name: g.Name, Total: uint64(g.Memory)})
	}
	dm := &dockerManager{rt: rt, engine: e, instance: opts.Instance, events: &eventLog{}}
	var mrt manager.Runtime = rt
	if wrap != nil {
		mrt = wrap(rt)
	}
	dm.Manager = manager.New(cfg, mrt, gpu.NewDeclared(gs), manager.Options{Tick: 20 * time.Millisecond, GPUPoll: 20 * time.Millisecond, OnEvent: dm.events.add})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { dm.Run(ctx); close(done) }()
	var once sync.Once
	dm.stop = func() { once.Do(func() { cancel(); <-done; rt.Close() }) }
	t.Cleanup(dm.stop)
	return dm
}

// containerStarts counts, by model, the containers of instance that the
// engine started since then.
func containerStarts(t *testing.T, e *dockertest.Engine, instance string, since time.Time) map[string]int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), poll.Long)
	defer cancel()
	until := time.Now()
	res := e.Client.Events(ctx, client.EventsListOptions{
		Since:   fmt.Sprintf("%d.%09d", since.Unix(), since.Nanosecond()),
		Until:   fmt.Sprintf("%d.%09d", until.Unix(), until.Nanosecond()),
		Filters: make(client.Filters).Add("type", "container").Add("event", "start").Add("label", docker.LabelInstance+"="+instance),
	})
	n := map[string]int{}
	for {
		select {
		case m := <-res.Messages:
			n[m.Actor.Attributes[docker.LabelModel]]++
		case err := <-res.Err:
			if err != nil && !errors.Is(err, io.EOF) {
				t.Fatalf("the engine's events: %v", err)
			}
			return n
		}
	}
}

// dockerProxy stands between vgw's Docker client and the engine: a unix
// socket that forwards each connection to the engine. Cut, it is as if
// dockerd stopped: the socket is gone and every connection through it
// (the event stream's too) is closed. Restored, it listens again at the
// same path.
type dockerProxy struct {
	path    string
	network string // the engine's address
	addr    string

	mu    sync.Mutex
	lis   net.Listener // nil while cut
	conns map[net.Conn]bool
	wg    sync.WaitGroup
}

// newDockerProxy listens in front of e's engine until the test ends.
func newDockerProxy(t *testing.T, e *dockertest.Engine) *dockerProxy {
	t.Helper()
	u, err := url.Parse(e.Client.DaemonHost())
	if err != nil {
		t.Fatal(err)
	}
	p := &dockerProxy{path: filepath.Join(t.TempDir(), "docker.sock"), conns: map[net.Conn]bool{}}
	switch {
	case os.Getenv("DOCKER_TLS_VERIFY") != "":
		t.Skip("skipped: the proxy in front of the engine does not speak TLS")
	case u.Scheme == "unix":
		p.network, p.addr = "unix", u.Path
	case u.Scheme == "tcp":
		p.network, p.addr = "tcp", u.Host
	default:
		t.Skipf("skipped: the proxy cannot reach an engine at %s", u)
	}
	p.restore(t)
	t.Cleanup(func() { p.cut(); p.wg.Wait() })
	return p
}

// host is the proxy's address, for a Docker client.
func (p *dockerProxy) host() string { return "unix://" + p.path }

// restore listens again.
func (p *dockerProxy) restore(t *testing.T) {
	t.Helper()
	lis, err := net.Listen("unix", p.path)
	if err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	p.lis = lis
	p.mu.Unlock()
	p.wg.Go(func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			p.wg.Go(func() { p.forward(lis, c) })
		}
	})
}

// cut closes the socket, which removes it, and every connection through
// it.
func (p *dockerProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.lis != nil {
		p.lis.Close()
		p.lis = nil
	}
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

// forward copies between c, accepted from lis, and a connection of its
// own to the engine, until either end closes or the proxy is cut.
func (p *dockerProxy) forward(lis net.Listener, c net.Conn) {
	up, err := net.Dial(p.network, p.addr)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	live := p.lis == lis // not cut since c was accepted
	if live {
		p.conns[c], p.conns[up] = true, true
	}
	p.mu.Unlock()
	if !live {
		c.Close()
		up.Close()
		return
	}
	done := make(chan struct{}, 2)
	go func() { io.Copy(up, c); done <- struct{}{} }()
	go func() { io.Copy(c, up); done <- struct{}{} }()
	<-done
	c.Close()
	up.Close()
	<-done
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, up)
	p.mu.Unlock()
}
