// Package docker is the runtime for a GPU server: each model's vLLM
// server runs as a container, started, watched and stopped through the
// Docker Engine API, and left running for the next vgw to adopt when vgw
// stops (see Runtime).
package docker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/pkg/stdcopy"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/events"
	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"

	"github.com/vgw-project/vgw/manager/gpu"
	"github.com/vgw-project/vgw/manager/runtime"
	"github.com/vgw-project/vgw/manager/runtime/vllm"
)

// The labels on every container the Docker runtime creates. vgw stops,
// removes or adopts a container only when it carries LabelManaged and
// this vgw's LabelInstance.
const (
	LabelManaged   = "vgw.managed"   // "true"
	LabelInstance  = "vgw.instance"  // runtime.instance
	LabelModel     = "vgw.model"     // the model's name
	LabelSignature = "vgw.signature" // its memory settings (Spec.Signature)
	LabelLaunch    = "vgw.launch"    // all it was started with (Spec.Launch)
	LabelGPUs      = "vgw.gpus"      // its GPUs' indexes, "0,1"
)

// apiTimeout bounds a Docker call made where no caller's context applies
// (cleaning up after a failed start), so that a hung daemon cannot hang
// vgw.
const apiTimeout = 30 * time.Second

// vllmPort is where vLLM serves in its container; vgw sets it (it is one
// of the flags extra_args may not set).
const vllmPort = 8000

// Errors a user can act on; Start's errors wrap them and say what to do.
// Their own text is what a model's clients are told (runtime.PublicError),
// without the detail around it.
var (
	ErrImageMissing   error = runtime.PublicError("the image is not on this Docker host")
	ErrNoGPURuntime   error = runtime.PublicError("this Docker engine cannot give containers GPUs")
	ErrNameTaken      error = runtime.PublicError("a container vgw did not create has the name")
	ErrNetworkMissing error = runtime.PublicError("the Docker network does not exist")
	// ErrUnreachable is a runtime.ErrUnreachable (errors.Is): the manager
	// retries such a load soon, as the model is not at fault.
	ErrUnreachable error = unreachableError{}
)

// unreachableError is ErrUnreachable: public, and a
// runtime.ErrUnreachable.
type unreachableError struct{}

func (unreachableError) Error() string    { return "the Docker daemon cannot be reached" }
func (e unreachableError) Public() string { return e.Error() }
func (unreachableError) Unwrap() error    { return runtime.ErrUnreachable }

// Options configure a Runtime.
type Options struct {
	// Host is the Docker daemon's address; empty takes DOCKER_HOST and
	// the rest of Docker's environment, then the local socket.
	Host string
	// Instance names this vgw on the host (see config's runtime.instance).
	Instance string
	// Image is the vLLM image. vgw never pulls it.
	Image string
	// Network is the Docker network the containers join; a model is
	// reached at its container's address there.
	Network string
	// CacheDir, when set, is the host directory mounted as the Hugging
	// Face cache.
	CacheDir string
	// ShmSize, when above zero, sizes /dev/shm instead of sharing the
	// host's IPC namespace.
	ShmSize int64
	// GPUDevices requests each model's GPUs by UUID from Docker's NVIDIA
	// device driver. Off for declared GPUs, which no driver knows.
	GPUDevices bool
	// Env goes into every container under the model's own env: the Hugging
	// Face token from vgw's environment.
	Env map[string]string
	// Log receives what the runtime does on its own (event stream
	// reconnects, leftovers removed).
	Log *slog.Logger
}

// Runtime runs each model's vLLM server as a container, through the
// Docker Engine API. Docker's event stream tells it of every container of
// its that dies, asked to or not.
type Runtime struct {
	cli   *client.Client
	opt   Options
	exits chan runtime.Exit
	stop  context.CancelFunc
	done  chan struct{}

	mu   sync.Mutex
	live map[string]*dockerContainer // by container ID, until its exit is reported
	// unremoved are containers a stop could not remove (the daemon was
	// unreachable): removed again once the event stream reconnects.
	unremoved map[string]bool
}

type dockerContainer struct {
	model    string
	stopping bool // Stop was called: its exit was asked for
	oom      bool // Docker reported the kernel's OOM killer
}

// New makes a client of the Docker daemon (which negotiates the API
// version on its first call) and starts watching its events. The daemon
// need not be up: calls fail with ErrUnreachable until it is, and the
// event watch reconnects.
func New(opt Options) (*Runtime, error) {
	if opt.Log == nil {
		opt.Log = slog.New(slog.DiscardHandler)
	}
	opts := []client.Opt{client.FromEnv} // the client negotiates the API version itself
	if opt.Host != "" {
		opts = append(opts, client.WithHost(opt.Host))
	}
	cli, err := client.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("docker client: %w", err)
	}
	ctx, stop := context.WithCancel(context.Background())
	r := &Runtime{cli: cli, opt: opt, exits: make(chan runtime.Exit, 64), stop: stop, done: make(chan struct{}),
		live: map[string]*dockerContainer{}, unremoved: map[string]bool{}}
	go r.watch(ctx)
	return r, nil
}

// Close stops watching events and closes the connection. Containers keep
// running, for the next vgw to adopt.
func (r *Runtime) Close() error {
	r.stop()
	<-r.done
	return r.cli.Close()
}

// Exits reports every container of this vgw that stops.
func (r *Runtime) Exits() <-chan runtime.Exit { return r.exits }

// ContainerName is the name of a model's container: the instance, then
// the model's name in the characters Docker allows, then, when the name
// had to change, a short hash that keeps two such models apart.
func ContainerName(instance, model string) string {
	var b strings.Builder
	changed := false
	for _, c := range model {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '_', c == '.', c == '-':
			b.WriteRune(c)
		default:
			b.WriteByte('-')
			changed = true
		}
	}
	name := instance + "-" + b.String()
	if changed {
		sum := sha256.Sum256([]byte(model))
		name += "-" + hex.EncodeToString(sum[:4])
	}
	return name
}

// filters selects this vgw's containers.
func (r *Runtime) filters() client.Filters {
	return make(client.Filters).Add("label", LabelManaged+"=true", LabelInstance+"="+r.opt.Instance)
}

// ours reports whether labels mark a container as this vgw's.
func (r *Runtime) ours(labels map[string]string) bool {
	return labels[LabelManaged] == "true" && labels[LabelInstance] == r.opt.Instance
}

// Start creates and starts the model's container and returns once it
// runs; the manager then polls its /health.
func (r *Runtime) Start(ctx context.Context, spec runtime.Spec) (*runtime.Instance, error) {
	name := ContainerName(r.opt.Instance, spec.Model)
	if inst, err := r.clearName(ctx, name, spec); inst != nil || err != nil {
		return inst, err
	}
	if _, err := r.cli.ImageInspect(ctx, r.opt.Image); err != nil {
		if cerrdefs.IsNotFound(err) {
			return nil, fmt.Errorf("%w: %s; pull it (docker pull %s) or set runtime.image; vgw does not pull images", ErrImageMissing, r.opt.Image, r.opt.Image)
		}
		return nil, r.daemonError("inspect image "+r.opt.Image, err)
	}
	if _, err := r.cli.NetworkInspect(ctx, r.opt.Network, client.NetworkInspectOptions{}); err != nil {
		if cerrdefs.IsNotFound(err) {
			return nil, fmt.Errorf("%w: %s; create it (docker network create %s) and attach Envoy and vgw to it, or set runtime.network", ErrNetworkMissing, r.opt.Network, r.opt.Network)
		}
		return nil, r.daemonError("inspect network "+r.opt.Network, err)
	}

	created, err := r.cli.ContainerCreate(ctx, r.createOptions(name, spec))
	if err != nil {
		if cerrdefs.IsConflict(err) {
			return nil, fmt.Errorf("%w %s (created meanwhile): %v", ErrNameTaken, name, err)
		}
		return nil, r.daemonError("create container "+name, err)
	}
	id := created.ID
	r.mu.Lock()
	r.live[id] = &dockerContainer{model: spec.Model} // before it starts: it may die at once
	r.mu.Unlock()
	fail := func(err error) (*runtime.Instance, error) {
		r.forget(id)
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), apiTimeout)
		defer cancel()
		r.remove(rctx, id)
		return nil, err
	}
	if _, err := r.cli.ContainerStart(ctx, id, client.ContainerStartOptions{}); err != nil {
		if strings.Contains(err.Error(), "could not select device driver") {
			return fail(fmt.Errorf("%w: install the NVIDIA Container Toolkit and restart dockerd (Docker said: %v)", ErrNoGPURuntime, err))
		}
		return fail(r.daemonError("start container "+name, err))
	}
	// Started, it is described whatever becomes of ctx: a caller that
	// gave up (vgw stopping) leaves a running container for the next vgw,
	// not a killed one.
	ictx, cancel := context.WithTimeout(context.WithoutCancel(ctx), apiTimeout)
	defer cancel()
	inst, err := r.instance(ictx, id)
	if errors.Is(err, errNotRunning) {
		// It died as it started: say why while its log is there.
		return fail(fmt.Errorf("container %s exited as it started; last log lines: %s", name, runtime.LastLines(r.logTail(ictx, id), 5)))
	}
	if err != nil {
		return fail(err)
	}
	return inst, nil
}

// errNotRunning is instance's answer for a container that has stopped.
var errNotRunning = errors.New("not running")

// clearName makes name free for spec's container. A container of this
// vgw's that holds it is taken over when it runs what spec would start, on
// the same GPUs (a previous vgw's, not adopted because Docker was down when
// this one started: starting nothing twice); any other of this vgw's (one
// that crashed and was kept for its logs, or runs other settings) is
// removed. So is one whose stop could not reach the daemon: that stop was
// asked for, and the removal queued for the reconnect would otherwise kill
// it under the new load. Anyone else's is left alone, and the start fails.
func (r *Runtime) clearName(ctx context.Context, name string, spec runtime.Spec) (*runtime.Instance, error) {
	res, err := r.cli.ContainerInspect(ctx, name, client.ContainerInspectOptions{})
	switch {
	case containerGone(err):
		return nil, nil
	case err != nil:
		return nil, r.daemonError("inspect container "+name, err)
	case res.Container.Config == nil || !r.ours(res.Container.Config.Labels):
		return nil, fmt.Errorf("%w %s; vgw leaves it alone: remove or rename it, or give this vgw another runtime.instance", ErrNameTaken, name)
	}
	c := res.Container
	labels := c.Config.Labels
	r.mu.Lock()
	queued := r.unremoved[c.ID]
	r.mu.Unlock()
	if !queued && c.State != nil && c.State.Running && labels[LabelLaunch] == spec.Launch && labels[LabelGPUs] == gpuList(spec.GPUs) {
		r.mu.Lock()
		r.live[c.ID] = &dockerContainer{model: spec.Model}
		r.mu.Unlock()
		if inst, err := r.instance(ctx, c.ID); err == nil {
			r.opt.Log.Info("taking over a running container of this vgw's", slog.String("container", name), slog.String("id", c.ID))
			return inst, nil
		}
	}
	r.opt.Log.Info("removing a container of this vgw's that holds the name", slog.String("container", name), slog.String("id", c.ID),
		slog.String("state", string(c.State.Status)))
	r.forget(c.ID)
	if err := r.remove(ctx, c.ID); err != nil {
		return nil, err
	}
	r.mu.Lock()
	delete(r.unremoved, c.ID)
	r.mu.Unlock()
	return nil, nil
}

// gpuList is GPU indexes as the vgw.gpus label has them.
func gpuList(gpus []gpu.GPU) string {
	s := make([]string, len(gpus))
	for i, g := range gpus {
		s[i] = strconv.Itoa(g.Index)
	}
	return strings.Join(s, ",")
}

// createOptions is the container for spec.
func (r *Runtime) createOptions(name string, spec runtime.Spec) client.ContainerCreateOptions {
	args, apiKey := withoutAPIKey(vllm.Args(spec.Model, spec.Config, spec.Utilization, spec.Sleep))
	env := make([]string, 0, len(r.opt.Env)+len(spec.Env)+1)
	for k, v := range r.opt.Env {
		if _, own := spec.Env[k]; !own {
			env = append(env, k+"="+v)
		}
	}
	for k, v := range spec.Env {
		env = append(env, k+"="+v)
	}
	if apiKey != "" {
		// vLLM reads the key from VLLM_API_KEY too; on its command line
		// it would show in every `ps` on the host.
		env = append(env, "VLLM_API_KEY="+apiKey)
	}
	uuids := make([]string, len(spec.GPUs))
	for i, g := range spec.GPUs {
		uuids[i] = g.UUID
	}
	host := &container.HostConfig{
		RestartPolicy: container.RestartPolicy{Name: container.RestartPolicyDisabled}, // vgw restarts what crashes
		IpcMode:       container.IPCModeHost,
		// A model's server runs code that came with its weights; it needs
		// no raw sockets, with which it could forge packets to the host's
		// loopback, where vgw listens, on hosts that route them there
		// (route_localnet).
		CapDrop: []string{"NET_RAW"},
	}
	if r.opt.ShmSize > 0 {
		host.IpcMode, host.ShmSize = container.IPCModePrivate, r.opt.ShmSize
	}
	// The Hugging Face cache: the host's directory, or a volume of this
	// vgw's, so that weights are downloaded once, not at every load.
	cache := mount.Mount{Type: mount.TypeBind, Source: r.opt.CacheDir, Target: "/root/.cache/huggingface"}
	if r.opt.CacheDir == "" {
		cache = mount.Mount{Type: mount.TypeVolume, Source: r.opt.Instance + "-hf-cache", Target: cache.Target,
			VolumeOptions: &mount.VolumeOptions{Labels: map[string]string{LabelManaged: "true", LabelInstance: r.opt.Instance}}}
	}
	host.Mounts = []mount.Mount{cache, r.compileCache()}
	// vLLM's torch.compile cache and Triton's kernels in that volume, so
	// that a new container does not compile again what the last one did
	// (minutes of a cold start), unless the model's env says otherwise.
	for _, kv := range []string{"VLLM_CACHE_ROOT=" + compileCacheDir + "/vllm", "TRITON_CACHE_DIR=" + compileCacheDir + "/triton"} {
		name, _, _ := strings.Cut(kv, "=")
		if _, own := spec.Env[name]; !own && r.opt.Env[name] == "" {
			env = append(env, kv)
		}
	}
	if r.opt.GPUDevices {
		host.DeviceRequests = []container.DeviceRequest{{Driver: "nvidia", DeviceIDs: uuids, Capabilities: [][]string{{"gpu"}}}}
	}
	return client.ContainerCreateOptions{
		Name: name,
		Config: &container.Config{
			Image: r.opt.Image,
			Cmd:   append(args, "--host", "0.0.0.0", "--port", strconv.Itoa(vllmPort)),
			Env:   env,
			Labels: map[string]string{
				LabelManaged: "true", LabelInstance: r.opt.Instance, LabelModel: spec.Model,
				LabelSignature: spec.Signature, LabelLaunch: spec.Launch, LabelGPUs: gpuList(spec.GPUs),
			},
		},
		HostConfig: host,
		NetworkingConfig: &network.NetworkingConfig{
			EndpointsConfig: map[string]*network.EndpointSettings{r.opt.Network: {}},
		},
	}
}

// compileCacheDir is where a container finds its compile caches.
const compileCacheDir = "/root/.cache/vgw-compile"

// compileCache is the volume of compiled kernels the containers of this
// vgw's image share: vLLM's torch.compile cache and Triton's. It is one
// per image reference, so that another vLLM, whose kernels differ, starts
// its own.
func (r *Runtime) compileCache() mount.Mount {
	sum := sha256.Sum256([]byte(r.opt.Image))
	return mount.Mount{Type: mount.TypeVolume, Source: r.opt.Instance + "-compile-cache-" + hex.EncodeToString(sum[:6]), Target: compileCacheDir,
		VolumeOptions: &mount.VolumeOptions{Labels: map[string]string{LabelManaged: "true", LabelInstance: r.opt.Instance, "vgw.image": r.opt.Image}}}
}

// instance describes a running container of this vgw's.
func (r *Runtime) instance(ctx context.Context, id string) (*runtime.Instance, error) {
	res, err := r.cli.ContainerInspect(ctx, id, client.ContainerInspectOptions{})
	if err != nil {
		return nil, r.daemonError("inspect container "+id, err)
	}
	c := res.Container
	if c.State == nil || !c.State.Running {
		return nil, fmt.Errorf("container %s: %w", strings.TrimPrefix(c.Name, "/"), errNotRunning)
	}
	var ep *network.EndpointSettings
	if c.NetworkSettings != nil {
		ep = c.NetworkSettings.Networks[r.opt.Network]
	}
	if ep == nil || !ep.IPAddress.IsValid() {
		return nil, fmt.Errorf("container %s has no address on network %s", strings.TrimPrefix(c.Name, "/"), r.opt.Network)
	}
	labels := c.Config.Labels
	inst := &runtime.Instance{
		ID:        c.ID,
		Model:     labels[LabelModel],
		Addr:      net.JoinHostPort(ep.IPAddress.String(), strconv.Itoa(vllmPort)),
		PIDs:      []int{c.State.Pid},
		Signature: labels[LabelSignature],
		Launch:    labels[LabelLaunch],
	}
	for _, g := range strings.Split(labels[LabelGPUs], ",") {
		if i, err := strconv.Atoi(g); err == nil {
			inst.GPUs = append(inst.GPUs, i)
		}
	}
	return inst, nil
}

// Stop stops the container, gracefully (SIGTERM) for up to grace, then
// by force, and removes it.
func (r *Runtime) Stop(ctx context.Context, inst *runtime.Instance, grace time.Duration) error {
	r.mu.Lock()
	if c := r.live[inst.ID]; c != nil {
		c.stopping = true
	}
	r.mu.Unlock()
	secs := int((grace + time.Second - 1) / time.Second) // Docker counts whole seconds; never less than asked
	_, err := r.cli.ContainerStop(ctx, inst.ID, client.ContainerStopOptions{Timeout: &secs})
	if err == nil || containerGone(err) {
		err = r.remove(ctx, inst.ID)
	}
	if err != nil && unreachable(err) {
		// Removed (killed first) as soon as the daemon is back: see watch.
		r.mu.Lock()
		r.unremoved[inst.ID] = true
		r.mu.Unlock()
	}
	if err != nil && !containerGone(err) {
		return r.daemonError("stop container "+inst.ID, err)
	}
	return nil
}

// remove removes a container, killing it first if it runs. One that
// someone else is removing (`docker rm -f` by hand) is waited for until it
// is gone: its name is taken until then, so a start that went ahead would
// fail on it.
func (r *Runtime) remove(ctx context.Context, id string) error {
	_, err := r.cli.ContainerRemove(ctx, id, client.ContainerRemoveOptions{Force: true})
	if removalUnderWay(err) {
		err = r.waitRemoved(ctx, id)
	}
	if err != nil && !containerGone(err) {
		return r.daemonError("remove container "+id, err)
	}
	return nil
}

// removalUnderWay reports whether err is Docker refusing a removal because
// another is in progress: a 409 "removal of container ... is already in
// progress" (moby daemon/delete.go, SetRemovalInProgress).
func removalUnderWay(err error) bool {
	return cerrdefs.IsConflict(err) && strings.Contains(err.Error(), "already in progress")
}

// waitRemoved waits until Docker has removed the container (the wait
// API's "removed" condition), for at most apiTimeout.
func (r *Runtime) waitRemoved(ctx context.Context, id string) error {
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	res := r.cli.ContainerWait(ctx, id, client.ContainerWaitOptions{Condition: container.WaitConditionRemoved})
	select {
	case <-res.Result:
		return nil
	case err := <-res.Error:
		return err
	}
}

func (r *Runtime) forget(id string) {
	r.mu.Lock()
	delete(r.live, id)
	r.mu.Unlock()
}

// Adopt lists this vgw's running containers, for the manager to keep or
// stop; containers of its that are not running are removed.
func (r *Runtime) Adopt(ctx context.Context) ([]*runtime.Instance, error) {
	list, err := r.cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: r.filters()})
	if err != nil {
		return nil, r.daemonError("list containers", err)
	}
	var out []*runtime.Instance
	for _, c := range list.Items {
		if !r.ours(c.Labels) { // the filter says so; checked again before anything is removed
			continue
		}
		r.mu.Lock()
		_, mine := r.live[c.ID]
		r.mu.Unlock()
		if mine {
			continue // this process started it (a start may be under way): not a leftover
		}
		if c.State != container.StateRunning {
			r.opt.Log.Info("removing a stopped container a previous vgw left", slog.String("id", c.ID), slog.String("model", c.Labels[LabelModel]))
			r.remove(ctx, c.ID)
			continue
		}
		r.mu.Lock()
		r.live[c.ID] = &dockerContainer{model: c.Labels[LabelModel]}
		r.mu.Unlock()
		inst, err := r.instance(ctx, c.ID)
		if err != nil {
			// Not usable (off the network, say): the manager stops it.
			r.opt.Log.Warn("a container of this vgw's cannot be adopted as it is", slog.String("id", c.ID), slog.String("error", err.Error()))
			inst = &runtime.Instance{ID: c.ID, Model: c.Labels[LabelModel]}
		}
		out = append(out, inst)
	}
	return out, nil
}

// PIDs lists the host process IDs in the container now: vLLM starts its
// engine and tensor-parallel workers as processes of their own after the
// container starts. Docker runs ps in the host's PID namespace, so these
// are the IDs NVML reports (with vgw in the host's PID namespace).
func (r *Runtime) PIDs(ctx context.Context, inst *runtime.Instance) ([]int, error) {
	top, err := r.cli.ContainerTop(ctx, inst.ID, client.ContainerTopOptions{})
	if err != nil {
		return nil, r.daemonError("list processes of "+inst.ID, err)
	}
	col := -1
	for i, t := range top.Titles {
		if t == "PID" {
			col = i
		}
	}
	if col < 0 {
		return nil, fmt.Errorf("docker top of %s has no PID column: %q", inst.ID, top.Titles)
	}
	var pids []int
	for _, p := range top.Processes {
		if col < len(p) {
			if pid, err := strconv.Atoi(p[col]); err == nil {
				pids = append(pids, pid)
			}
		}
	}
	return pids, nil
}

// daemonError says what failed, and whether the daemon could be reached.
func (r *Runtime) daemonError(what string, err error) error {
	if client.IsErrConnectionFailed(err) {
		return fmt.Errorf("%w at %s (is dockerd running, and may vgw use its socket?): %s: %v", ErrUnreachable, r.cli.DaemonHost(), what, err)
	}
	return fmt.Errorf("docker: %s: %w", what, err)
}

// containerGone reports whether err says the container does not exist. Docker
// 20.10 answers an inspect of a container it has just removed with a 500
// that says so, not a 404.
func containerGone(err error) bool {
	return cerrdefs.IsNotFound(err) || err != nil && strings.Contains(err.Error(), "No such container")
}

// unreachable reports whether err says the daemon could not be reached.
func unreachable(err error) bool {
	return errors.Is(err, ErrUnreachable) || client.IsErrConnectionFailed(err)
}

// watch follows Docker's events for this vgw's containers until ctx ends,
// reconnecting with backoff when the stream breaks (dockerd restarted).
// Each connection replays events from the last one seen, and is followed
// by a look at every container it tracks: Docker keeps only its last few
// hundred events, in memory, so a death during a long gap or a daemon
// restart is found by inspecting.
func (r *Runtime) watch(ctx context.Context) {
	defer close(r.done)
	since := time.Now()
	backoff := 100 * time.Millisecond
	for first := true; ctx.Err() == nil; first = false {
		res := r.cli.Events(ctx, client.EventsListOptions{
			Since:   fmt.Sprintf("%d.%09d", since.Unix(), since.Nanosecond()),
			Filters: r.filters().Add("type", string(events.ContainerEventType)).Add("event", string(events.ActionDie), string(events.ActionOOM)),
		})
		if !first {
			go r.reconcile(ctx)
		}
		err := r.follow(ctx, res, &since, &backoff)
		if ctx.Err() != nil {
			return
		}
		r.opt.Log.Warn("lost Docker's event stream; reconnecting", slog.String("error", err.Error()), slog.Duration("in", backoff))
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// reconcile reports the exit of every tracked container found stopped or
// gone, and removes the containers a stop could not.
func (r *Runtime) reconcile(ctx context.Context) {
	actx, cancel := context.WithTimeout(ctx, apiTimeout) // ctx itself outlives this look, for the exits it sends
	defer cancel()
	r.mu.Lock()
	ids := make([]string, 0, len(r.live))
	for id := range r.live {
		ids = append(ids, id)
	}
	var unremoved []string
	for id := range r.unremoved {
		unremoved = append(unremoved, id)
	}
	r.mu.Unlock()
	for _, id := range unremoved {
		if err := r.remove(actx, id); err == nil {
			r.mu.Lock()
			delete(r.unremoved, id)
			r.mu.Unlock()
		}
	}
	for _, id := range ids {
		res, err := r.cli.ContainerInspect(actx, id, client.ContainerInspectOptions{})
		switch {
		case containerGone(err):
			r.died(ctx, id, -1, false)
		case err != nil:
			return // the daemon is away again: the next connection looks again
		case res.Container.State != nil && !res.Container.State.Running:
			r.died(ctx, id, res.Container.State.ExitCode, res.Container.State.OOMKilled)
		}
	}
}

// follow handles one connection's events until it fails.
func (r *Runtime) follow(ctx context.Context, res client.EventsResult, since *time.Time, backoff *time.Duration) error {
	for {
		select {
		case m := <-res.Messages:
			*backoff = 100 * time.Millisecond
			if m.TimeNano > 0 {
				*since = time.Unix(0, m.TimeNano)
			}
			r.handle(ctx, m)
		case err := <-res.Err:
			if err == nil {
				err = errors.New("stream ended")
			}
			return err
		}
	}
}

func (r *Runtime) handle(ctx context.Context, m events.Message) {
	switch m.Action {
	case events.ActionOOM:
		r.mu.Lock()
		if c := r.live[m.Actor.ID]; c != nil {
			c.oom = true
		}
		r.mu.Unlock()
	case events.ActionDie:
		code, _ := strconv.Atoi(m.Actor.Attributes["exitCode"])
		r.died(ctx, m.Actor.ID, code, false)
	}
}

// died reports a tracked container's exit, once: the event and a look
// after a reconnect may both find it. The log is read on a goroutine of
// its own, so that one crash does not hold up the report of the next.
func (r *Runtime) died(ctx context.Context, id string, code int, oom bool) {
	r.mu.Lock()
	c := r.live[id]
	delete(r.live, id)
	r.mu.Unlock()
	if c == nil {
		return
	}
	e := runtime.Exit{ID: id, Model: c.model, Code: code, Reason: exitReason(code, c.oom || oom), Requested: c.stopping}
	if code < 0 {
		e.Reason = "removed"
	}
	go func() {
		switch {
		case c.stopping:
			e.Reason = "stopped"
		case r.removedByHand(ctx, id):
			e.Reason, e.Removed = "removed (docker rm -f)", true
		default:
			e.LogTail = r.logTail(ctx, id)
		}
		select {
		case r.exits <- e:
		case <-ctx.Done():
		}
	}()
}

// removedByHand reports whether a container that died is gone, or being
// removed: someone removed it (docker rm -f kills, then removes), as vgw
// keeps the containers it did not stop, for their logs.
func (r *Runtime) removedByHand(ctx context.Context, id string) bool {
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	res, err := r.cli.ContainerInspect(ctx, id, client.ContainerInspectOptions{})
	if containerGone(err) {
		return true
	}
	return err == nil && res.Container.State != nil && res.Container.State.Status == container.StateRemoving
}

// exitReason says how a container ended, from its exit code.
func exitReason(code int, oom bool) string {
	switch {
	case oom:
		return "killed: out of memory"
	case code == 137:
		return "killed (SIGKILL)"
	case code == 143:
		return "terminated (SIGTERM)"
	}
	return "exited"
}

// logTail is the end of a container's log, for the error of its failed
// load or its crash. A crashed container is kept until its model starts
// again, so that `docker logs` has the whole of it.
func (r *Runtime) logTail(ctx context.Context, id string) string {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	rc, err := r.cli.ContainerLogs(ctx, id, client.ContainerLogsOptions{ShowStdout: true, ShowStderr: true, Tail: "50"})
	if err != nil {
		return ""
	}
	defer rc.Close()
	tail := runtime.NewLogTail(50)
	stdcopy.StdCopy(tail, tail, rc)
	return tail.String()
}

// FollowLog calls line for each line the container writes, from since
// (to the second: Docker's resolution) until ctx ends or the container
// stops: how a loading vLLM's progress is read.
func (r *Runtime) FollowLog(ctx context.Context, inst *runtime.Instance, since time.Time, line func(string)) error {
	rc, err := r.cli.ContainerLogs(ctx, inst.ID, client.ContainerLogsOptions{ShowStdout: true, ShowStderr: true, Follow: true,
		Since: strconv.FormatInt(since.Unix(), 10)})
	if err != nil {
		return r.daemonError("follow the log of container "+inst.ID, err)
	}
	defer rc.Close()
	lines := runtime.NewLines(line)
	if _, err := stdcopy.StdCopy(lines, lines, rc); err != nil && ctx.Err() == nil {
		return fmt.Errorf("follow the log of container %s: %w", inst.ID, err)
	}
	return nil
}

// withoutAPIKey takes --api-key and its value out of vLLM's arguments.
func withoutAPIKey(args []string) (rest []string, key string) {
	rest = make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case a == "--api-key" && i+1 < len(args):
			key = args[i+1]
			i++
		case strings.HasPrefix(a, "--api-key="):
			key = strings.TrimPrefix(a, "--api-key=")
		default:
			rest = append(rest, a)
		}
	}
	return rest, key
}
