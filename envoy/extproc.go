package envoy

import (
	"errors"
	"fmt"
	"iter"
	"slices"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
)

// ClusterHeader is the request header vgw sets to choose the upstream
// cluster, which the route must read with cluster_header.
const ClusterHeader = "x-vgw-cluster"

// Envoy's defaults that vgw's checks compare against.
const (
	defaultStreamIdleTimeout = 5 * time.Minute  // http_connection_manager.proto, stream_idle_timeout
	defaultRouteTimeout      = 15 * time.Second // route_components.proto, RouteAction.timeout
)

// ExtProc returns the first ext_proc filter configured in b's static
// listeners, which is the one vgw serves.
func ExtProc(b *bootstrapv3.Bootstrap) (*extprocv3.ExternalProcessor, error) {
	for _, hcm := range staticHCMs(b) {
		for _, hf := range hcm.GetHttpFilters() {
			if ep, ok := unpack(hf.GetTypedConfig(), &extprocv3.ExternalProcessor{}); ok {
				return ep, nil
			}
		}
	}
	return nil, errors.New("no ext_proc HTTP filter in the static listeners")
}

// staticHCMs yields every HTTP connection manager in b's static
// listeners, with the index of its listener.
func staticHCMs(b *bootstrapv3.Bootstrap) iter.Seq2[int, *hcmv3.HttpConnectionManager] {
	return func(yield func(int, *hcmv3.HttpConnectionManager) bool) {
		for li, l := range b.GetStaticResources().GetListeners() {
			for _, fc := range l.GetFilterChains() {
				for _, f := range fc.GetFilters() {
					if hcm, ok := unpack(f.GetTypedConfig(), &hcmv3.HttpConnectionManager{}); ok && !yield(li, hcm) {
						return
					}
				}
			}
		}
	}
}

// extProc checks an ext_proc filter against what vgw relies on. The
// reasons cite Envoy's source; see ../shared/ENVOY-FACTS.md.
func (c *checker) extProc(path string, ep *extprocv3.ExternalProcessor, hcm *hcmv3.HttpConnectionManager, env *bootEnv) {
	gs := ep.GetGrpcService()
	c.nodeMetadata(path, gs.GetInitialMetadata(), env.usesXDS, env.node)
	switch {
	case gs == nil:
		c.errorf(path, "vgw is a gRPC external processor: set grpc_service")
	case gs.GetEnvoyGrpc() != nil:
		name := gs.GetEnvoyGrpc().GetClusterName()
		cl := env.clusters[name]
		switch {
		case cl == nil:
			// vgw's xDS serves model clusters only: vgw's own must be static.
			c.errorf(path+".grpc_service.envoy_grpc.cluster_name", "cluster %q is not defined", name)
		case !speaksHTTP2(cl):
			c.errorf(path+".grpc_service.envoy_grpc.cluster_name",
				"cluster %q must speak HTTP/2 for gRPC: set typed_extension_protocol_options[envoy.extensions.upstreams.http.v3.HttpProtocolOptions].explicit_http_config.http2_protocol_options", name)
		}
	}
	if ep.GetFailureModeAllow() {
		// ext_proc.cc onGrpcError: fail-open sends the request upstream
		// unprocessed, unadmitted and routed by whatever x-vgw-cluster the
		// client sent.
		c.errorf(path+".failure_mode_allow", "must be false: fail-open bypasses admission and lets clients pick the cluster")
	}
	if ep.GetObservabilityMode() {
		c.errorf(path+".observability_mode", "must be false: Envoy ignores the processor's replies in observability mode, so nothing can be admitted")
	}

	pm := ep.GetProcessingMode()
	if m := pm.GetRequestHeaderMode(); m != extprocv3.ProcessingMode_DEFAULT && m != extprocv3.ProcessingMode_SEND {
		c.errorf(path+".processing_mode.request_header_mode", "must be SEND: vgw decides on the request headers or body")
	}
	if m := pm.GetRequestBodyMode(); m != extprocv3.ProcessingMode_BUFFERED {
		c.errorf(path+".processing_mode.request_body_mode", "must be BUFFERED: the model name is in the body, which must reach vgw whole before Envoy routes, got %v", m)
	}
	if pm.GetRequestTrailerMode() != extprocv3.ProcessingMode_SEND {
		c.warnf(path+".processing_mode.request_trailer_mode", "SEND lets vgw answer a request that has trailers but no body; without it such a request goes on unrouted and gets Envoy's 503 (cluster not found)")
	}
	switch pm.GetResponseBodyMode() {
	case extprocv3.ProcessingMode_NONE:
		// The response's end is seen only as the stream's end, which Envoy
		// delays until the HTTP stream is destroyed only if a later phase is
		// still configured (ext_proc.cc, processor_state.cc early close).
		if pm.GetResponseTrailerMode() != extprocv3.ProcessingMode_SEND {
			c.errorf(path+".processing_mode.response_trailer_mode",
				"must be SEND when response_body_mode is NONE: otherwise Envoy closes the ext_proc stream before a streamed response ends and vgw frees the slot early")
		}
	case extprocv3.ProcessingMode_STREAMED:
		c.warnf(path+".processing_mode.response_body_mode", "STREAMED costs a round trip to vgw per response chunk; NONE with response_trailer_mode SEND costs none")
	default:
		c.errorf(path+".processing_mode.response_body_mode", "must be NONE or STREAMED: %v holds back or reshapes streamed (SSE) responses", pm.GetResponseBodyMode())
	}
	// vgw routes by setting x-vgw-cluster and clearing the route cache, and
	// answers what it refuses with an immediate response: settings that
	// undo either leave requests routed by the client's own header, or
	// every refusal a 500 (ext_proc.cc, processor_state.cc; mutation
	// rules: mutation_rules.cc isAllowed).
	if ep.GetDisableClearRouteCache() || ep.GetRouteCacheAction() == extprocv3.ExternalProcessor_RETAIN {
		c.errorf(path+".route_cache_action", "must clear the route cache: otherwise Envoy ignores vgw's clear_route_cache and routes by the route resolved before vgw answered, which may be the client's own x-vgw-cluster")
	}
	if ep.GetDisableImmediateResponse() {
		c.errorf(path+".disable_immediate_response", "must be false: vgw answers what it refuses (404, 413, 429, 503, 504) with an immediate response, which Envoy would turn into a 500")
	}
	if ep.GetMutationRules() != nil {
		c.warnf(path+".mutation_rules", "vgw must be allowed to set and remove x-vgw-cluster, x-vgw-model and x-vgw-queue-depth; a rule that refuses them leaves requests unrouted or routed by the client")
	}
	if ep.GetForwardRules() != nil {
		c.warnf(path+".forward_rules", "vgw must see x-vgw-cluster and x-vgw-model in the request headers: hidden, a client's own x-vgw-cluster is never dropped")
	}
	if ep.GetSendBodyWithoutWaitingForHeaderResponse() {
		c.warnf(path+".send_body_without_waiting_for_header_response", "makes Envoy ignore mode overrides, so the x-vgw-model fast path still buffers the body")
	}

	maxMsg := ep.GetMaxMessageTimeout().AsDuration()
	if maxMsg == 0 {
		c.warnf(path+".max_message_timeout", "unset: Envoy accepts no override_message_timeout, so a request can wait for a slot or a load only message_timeout (default 200ms)")
	}
	// The longest vgw holds a request: max_message_timeout, or without
	// it message_timeout (200ms unless set, config.h).
	wait := maxMsg
	if wait == 0 {
		wait = 200 * time.Millisecond
		if t := ep.GetMessageTimeout(); t != nil {
			wait = t.AsDuration()
		}
	}

	found := false
	for vi, vh := range hcm.GetRouteConfig().GetVirtualHosts() {
		for ri, r := range vh.GetRoutes() {
			ra := r.GetRoute()
			if ra.GetClusterHeader() != ClusterHeader {
				continue
			}
			found = true
			if idle := (vgwRoute{hcm: hcm}).idle(r).timeout; idle != 0 && wait > idle {
				c.errorf(fmt.Sprintf("route_config.virtual_hosts[%d].routes[%d]", vi, ri),
					"has an idle timeout (its idle_timeout, else the connection manager's stream_idle_timeout) of %v, under the %v vgw may hold a request (max_message_timeout, or message_timeout without it): a request still waiting would be cut with 504 (utility.cc maybeRequestTimeoutCode); raise it above that, and above the time a model may take to its first byte", idle, wait)
			}
			if ra.GetTimeout() == nil {
				c.warnf(fmt.Sprintf("route_config.virtual_hosts[%d].routes[%d].route.timeout", vi, ri),
					"unset: Envoy's default %v cuts streamed responses that take longer; set 0s", defaultRouteTimeout)
			}
		}
	}
	if !found && hcm.GetRouteConfig() != nil {
		c.errorf(path, "no route of this connection manager reads cluster_header %q, so vgw's routing answer is never used", ClusterHeader)
	}
}

// NodeMetadata is the ext_proc stream metadata by which an Envoy names
// itself to vgw (extproc.MetadataNode).
const NodeMetadata = "x-vgw-node"

// HostnameNode is the x-vgw-node value that names each Envoy by its
// hostname: Envoy formats it for every ext_proc stream (HOSTNAME,
// formatter/stream_info_formatter.cc), and its node id must then be the
// same hostname, given on its command line (--service-node), as the
// shipped docker-compose.yaml does.
const HostnameNode = "%HOSTNAME%"

// nodeMetadata checks that the ext_proc filter names this Envoy as its
// node id says: vgw waits for that node's xDS acknowledgement before it
// releases a request for a model that just loaded.
func (c *checker) nodeMetadata(path string, md []*corev3.HeaderValue, usesXDS bool, node string) {
	for _, h := range md {
		if h.GetKey() != NodeMetadata {
			continue
		}
		if node != "" && h.GetValue() != node && h.GetValue() != HostnameNode {
			c.errorf(path+".grpc_service.initial_metadata", "%s is %q but node.id is %q: vgw would wait for another Envoy's xDS acknowledgement (or use %q and run Envoy with --service-node set to its hostname)", NodeMetadata, h.GetValue(), node, HostnameNode)
		}
		return
	}
	if usesXDS {
		c.warnf(path+".grpc_service.initial_metadata", "no %s: vgw cannot tell which Envoy a request comes from, so a request for a model that just loaded waits for every Envoy's xDS acknowledgement", NodeMetadata)
	}
}

// speaksHTTP2 reports whether Envoy talks HTTP/2 to the cluster.
func speaksHTTP2(cl *clusterv3.Cluster) bool {
	//lint:ignore SA1019 Envoy still honours the deprecated field, so the check must too.
	if cl.GetHttp2ProtocolOptions() != nil {
		return true
	}
	opts, ok := unpack(cl.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"], &upstreamhttpv3.HttpProtocolOptions{})
	return ok && opts.GetExplicitHttpConfig().GetHttp2ProtocolOptions() != nil
}

// Expect is what a vgw config says Envoy's ext_proc filter is set to.
type Expect struct {
	MessageTimeout    time.Duration
	MaxMessageTimeout time.Duration
	MaxBodyBytes      int64
	// MaxAudioBodyBytes is vgw's limit for the bodies of the audio
	// routes (AudioPaths), uploads that may be larger than JSON.
	MaxAudioBodyBytes int64
	// RecvLimit is the largest message vgw's ext_proc listener accepts.
	RecvLimit int64
	// StreamIdleTimeout is vgw's envoy.stream_idle_timeout, which ends
	// ext_proc streams left silent longer (by a margin).
	StreamIdleTimeout time.Duration
	// TrustModelHeader is vgw's trust_model_header: a front that sets
	// x-vgw-model must not have Envoy drop it.
	TrustModelHeader bool
	// ObjectiveHeader is vgw's objective_header, which sets a request's
	// priority: unless Envoy drops a client's, clients choose their own.
	ObjectiveHeader string
}

// CheckAgainst reports where b's ext_proc filter and body buffer limit
// disagree with the vgw config that will serve it. vgw sizes its waits by
// max_message_timeout and its 413 by the buffer limit, so a mismatch means
// Envoy answers (504, or 413 in text) where vgw should have.
func CheckAgainst(b *bootstrapv3.Bootstrap, want Expect) []Problem {
	c := &checker{}
	ep, err := ExtProc(b)
	if err != nil {
		c.errorf("", "%v", err)
		return c.problems
	}
	msg := 200 * time.Millisecond
	if t := ep.GetMessageTimeout(); t != nil {
		msg = t.AsDuration()
	}
	if msg != want.MessageTimeout {
		c.errorf("ext_proc.message_timeout", "is %v, vgw's envoy.message_timeout is %v", msg, want.MessageTimeout)
	}
	if got := ep.GetMaxMessageTimeout().AsDuration(); got != want.MaxMessageTimeout {
		c.errorf("ext_proc.max_message_timeout", "is %v, vgw's envoy.max_message_timeout is %v", got, want.MaxMessageTimeout)
	}
	if fr, ok := FrontOf(b); ok && want.TrustModelHeader && StripsEarly(fr.HCM, "x-vgw-model") {
		c.errorf("early_header_mutation_extensions", "removes x-vgw-model, which vgw's trust_model_header says a trusted front sets: remove only x-vgw-cluster and x-vgw-queue-depth")
	}
	if fr, ok := FrontOf(b); ok && want.ObjectiveHeader != "" && !StripsEarly(fr.HCM, want.ObjectiveHeader) {
		c.warnf("early_header_mutation_extensions", "does not remove %s, vgw's objective_header: each client chooses its own priority (remove_on_match it, as envoy/envoy.yaml does, unless that is meant)", want.ObjectiveHeader)
	}
	seen := map[string]bool{} // the connection manager's, for each of its routes
	for _, idle := range streamIdleTimeouts(b) {
		if seen[idle.path] {
			continue
		}
		seen[idle.path] = true
		if idle.timeout != want.StreamIdleTimeout {
			c.errorf(idle.path, "is %v, vgw's envoy.stream_idle_timeout is %v: vgw bounds how long an ext_proc stream may stay silent by it", idle.timeout, want.StreamIdleTimeout)
		}
	}
	for _, limit := range bodyLimits(b) {
		wantBytes, key := want.MaxBodyBytes, "max_body_bytes"
		if limit.audio && want.MaxAudioBodyBytes > 0 {
			wantBytes, key = want.MaxAudioBodyBytes, "max_audio_body_bytes"
		}
		if limit.bytes < wantBytes {
			c.errorf(limit.path, "is %d bytes, under vgw's %s %d: Envoy would answer 413 before vgw sees the body", limit.bytes, key, wantBytes)
		}
		if want.RecvLimit > 0 && limit.bytes > want.RecvLimit {
			c.errorf(limit.path, "is %d bytes, over the %d bytes vgw's ext_proc listener receives: such a body would fail with Envoy's 500 instead of vgw's 413", limit.bytes, want.RecvLimit)
		}
	}
	return c.problems
}

type streamIdle struct {
	path    string
	timeout time.Duration
}

// vgwRoute is a route vgw names the cluster for (cluster_header), in a
// connection manager that runs vgw's ext_proc filter, with where it is.
type vgwRoute struct {
	listener, vhost, route int
	hcm                    *hcmv3.HttpConnectionManager
	vh                     *routev3.VirtualHost
}

// vgwRoutes yields the routes vgw names the cluster for.
func vgwRoutes(b *bootstrapv3.Bootstrap) iter.Seq2[vgwRoute, *routev3.Route] {
	return func(yield func(vgwRoute, *routev3.Route) bool) {
		for li, hcm := range staticHCMs(b) {
			if !slices.ContainsFunc(hcm.GetHttpFilters(), func(hf *hcmv3.HttpFilter) bool {
				_, ok := unpack(hf.GetTypedConfig(), &extprocv3.ExternalProcessor{})
				return ok
			}) {
				continue
			}
			for vi, vh := range hcm.GetRouteConfig().GetVirtualHosts() {
				for ri, r := range vh.GetRoutes() {
					if r.GetRoute().GetClusterHeader() != ClusterHeader {
						continue
					}
					if !yield(vgwRoute{listener: li, vhost: vi, route: ri, hcm: hcm, vh: vh}, r) {
						return
					}
				}
			}
		}
	}
}

// idle is the route's idle timeout and the field that sets it: the
// route's idle_timeout, which overrides the connection manager's
// stream_idle_timeout, else that (5m unless set, 0 for none;
// http_connection_manager.proto, route_components.proto).
func (v vgwRoute) idle(r *routev3.Route) streamIdle {
	if t := r.GetRoute().GetIdleTimeout(); t != nil {
		return streamIdle{fmt.Sprintf("static_resources.listeners[%d] virtual_hosts[%d].routes[%d].route.idle_timeout", v.listener, v.vhost, v.route), t.AsDuration()}
	}
	idle := defaultStreamIdleTimeout
	if t := v.hcm.GetStreamIdleTimeout(); t != nil {
		idle = t.AsDuration()
	}
	return streamIdle{fmt.Sprintf("static_resources.listeners[%d] stream_idle_timeout", v.listener), idle}
}

// streamIdleTimeouts lists the idle timeout of every route vgw names the
// cluster for.
func streamIdleTimeouts(b *bootstrapv3.Bootstrap) []streamIdle {
	var out []streamIdle
	for v, r := range vgwRoutes(b) {
		out = append(out, v.idle(r))
	}
	return out
}

type bodyLimit struct {
	path  string
	bytes int64
	audio bool // the route takes the audio uploads (AudioPaths)
}

// bodyLimit is the request body buffer limit Envoy applies to a route's
// requests, and the field that sets it. A route's own
// request_body_buffer_limit comes first, then its virtual host's, then the
// deprecated per_request_buffer_limit_bytes of the route, then of the
// virtual host (config_impl.cc getRequestBodyBufferLimit); the result
// only ever raises the listener's per-connection limit
// (conn_manager_impl.cc refreshBufferLimit) or, over HTTP/2, the stream's
// (see streamLimit).
func (v vgwRoute) bodyLimit(r *routev3.Route, start bodyLimit) bodyLimit {
	at := func(field string) string {
		return fmt.Sprintf("static_resources.listeners[%d] virtual_hosts[%d].%s", v.listener, v.vhost, field)
	}
	routeAt := func(field string) string { return at(fmt.Sprintf("routes[%d].%s", v.route, field)) }
	var path string
	limit := int64(-1)
	//lint:ignore SA1019 Envoy still honours the deprecated fields, so the check must too.
	routeLegacy, vhostLegacy := r.GetPerRequestBufferLimitBytes(), v.vh.GetPerRequestBufferLimitBytes()
	switch {
	case r.GetRequestBodyBufferLimit() != nil:
		path, limit = routeAt("request_body_buffer_limit"), int64(min(r.GetRequestBodyBufferLimit().GetValue(), 1<<62))
	case v.vh.GetRequestBodyBufferLimit() != nil:
		path, limit = at("request_body_buffer_limit"), int64(min(v.vh.GetRequestBodyBufferLimit().GetValue(), 1<<62))
	case routeLegacy != nil:
		path, limit = routeAt("per_request_buffer_limit_bytes"), int64(routeLegacy.GetValue())
	case vhostLegacy != nil:
		path, limit = at("per_request_buffer_limit_bytes"), int64(vhostLegacy.GetValue())
	}
	if limit <= start.bytes {
		return start
	}
	return bodyLimit{path: path, bytes: limit}
}

// defaultH2StreamWindow is Envoy's initial_stream_window_size when unset
// (http_option_limits.h DEFAULT_INITIAL_STREAM_WINDOW_SIZE).
const defaultH2StreamWindow = 16 << 20

// streamLimit is the buffer limit a request starts with, before its route
// raises it (conn_manager_impl.cc: the ActiveStream takes the codec
// stream's bufferLimit): the listener's per-connection limit over
// HTTP/1, and over HTTP/2 the stream's receive window (http2/codec_impl.cc
// per_stream_buffer_limit_ from initial_stream_window_size), which a
// connection manager that accepts both (codec_type AUTO) may meet.
func (v vgwRoute) streamLimit(l *listenerv3.Listener) bodyLimit {
	start := bodyLimit{path: fmt.Sprintf("static_resources.listeners[%d].per_connection_buffer_limit_bytes", v.listener), bytes: connBufferLimit(l)}
	switch v.hcm.GetCodecType() {
	case hcmv3.HttpConnectionManager_AUTO, hcmv3.HttpConnectionManager_HTTP2:
		window := int64(defaultH2StreamWindow)
		if w := v.hcm.GetHttp2ProtocolOptions().GetInitialStreamWindowSize(); w != nil {
			window = int64(w.GetValue())
		}
		if window > start.bytes {
			start = bodyLimit{path: fmt.Sprintf("static_resources.listeners[%d] http2_protocol_options.initial_stream_window_size", v.listener), bytes: window}
		}
	}
	return start
}

// connBufferLimit is a listener's per_connection_buffer_limit_bytes, 1 MiB
// unless set (listener.proto).
func connBufferLimit(l *listenerv3.Listener) int64 {
	if v := l.GetPerConnectionBufferLimitBytes(); v != nil {
		return int64(v.GetValue())
	}
	return 1 << 20
}

// bodyLimits returns the request body buffer limit of every route vgw
// names the cluster for.
func bodyLimits(b *bootstrapv3.Bootstrap) []bodyLimit {
	var out []bodyLimit
	listeners := b.GetStaticResources().GetListeners()
	for v, r := range vgwRoutes(b) {
		l := v.bodyLimit(r, v.streamLimit(listeners[v.listener]))
		l.audio = slices.ContainsFunc(AudioPaths, func(p string) bool { ok, _ := matches(r.GetMatch(), p); return ok })
		out = append(out, l)
	}
	return out
}

// Route is what an Envoy configured by a bootstrap applies to the requests
// vgw routes, for a harness that plays that Envoy.
type Route struct {
	// StreamIdleTimeout is the route's idle timeout (0: none).
	StreamIdleTimeout time.Duration
	// BodyBufferLimit is the request body buffer limit its requests get.
	BodyBufferLimit int64
}

// RouteOf returns the route vgw names the cluster for that a request for
// path takes (the first in its virtual host that matches the path), and
// whether b has one.
func RouteOf(b *bootstrapv3.Bootstrap, path string) (Route, bool) {
	for v, r := range vgwRoutes(b) {
		if first, _ := RouteFor(v.vh, path); first != r {
			continue
		}
		start := v.streamLimit(b.GetStaticResources().GetListeners()[v.listener])
		return Route{StreamIdleTimeout: v.idle(r).timeout, BodyBufferLimit: v.bodyLimit(r, start).bytes}, true
	}
	return Route{}, false
}
