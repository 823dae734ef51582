// Package envoy holds vgw's Envoy bootstrap files and checks them the way
// Envoy would load them: parsed into the Bootstrap proto from
// go-control-plane, validated with the protoc-gen-validate rules Envoy
// enforces, every typed_config unpacked and validated in turn, and then the
// cross-references that only Envoy's own loaders check. On top of that it
// checks what vgw needs of the ext_proc filter.
package envoy

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"

	// Extensions a vgw bootstrap may name in a typed_config: importing them
	// registers their types, so that their Any values can be unpacked.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/filters/cel/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/buffer/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/cors/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/health_check/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/http/early_header_mutation/header_mutation/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
)

// Load reads an Envoy bootstrap from a YAML or JSON file. It fails on
// unknown fields and on typed_config types it cannot resolve, as Envoy does.
func Load(path string) (*bootstrapv3.Bootstrap, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read Envoy bootstrap: %w", err)
	}
	b, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return b, nil
}

// Parse decodes a bootstrap from YAML or JSON: YAML to JSON, then protojson
// into the Bootstrap proto, the same mapping Envoy applies to a YAML file.
func Parse(data []byte) (*bootstrapv3.Bootstrap, error) {
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, fmt.Errorf("parse YAML: %w", err)
	}
	b := &bootstrapv3.Bootstrap{}
	if err := protojson.Unmarshal(js, b); err != nil {
		return nil, fmt.Errorf("decode bootstrap: %w", err)
	}
	return b, nil
}

// A Problem is one thing wrong with a bootstrap, at a field path.
type Problem struct {
	Path    string
	Message string
	// Warning marks something Envoy accepts but that works against vgw.
	Warning bool
}

func (p Problem) String() string {
	kind := "error"
	if p.Warning {
		kind = "warning"
	}
	if p.Path == "" {
		return kind + ": " + p.Message
	}
	return kind + ": " + p.Path + ": " + p.Message
}

// Errors returns only the problems that are not warnings.
func Errors(ps []Problem) []Problem {
	var out []Problem
	for _, p := range ps {
		if !p.Warning {
			out = append(out, p)
		}
	}
	return out
}

// Check validates b and returns every problem found, errors and warnings.
func Check(b *bootstrapv3.Bootstrap) []Problem {
	c := &checker{}
	if err := b.ValidateAll(); err != nil {
		c.validationErrors("", err)
	}
	c.walk("", b.ProtoReflect())
	c.crossReferences(b)
	return c.problems
}

type checker struct {
	problems []Problem
}

func (c *checker) errorf(path, format string, args ...any) {
	c.problems = append(c.problems, Problem{Path: path, Message: fmt.Sprintf(format, args...)})
}

func (c *checker) warnf(path, format string, args ...any) {
	c.problems = append(c.problems, Problem{Path: path, Message: fmt.Sprintf(format, args...), Warning: true})
}

// validationErrors splits a protoc-gen-validate MultiError into problems.
func (c *checker) validationErrors(path string, err error) {
	var multi interface{ AllErrors() []error }
	if errors.As(err, &multi) {
		for _, e := range multi.AllErrors() {
			c.errorf(path, "%v", e)
		}
		return
	}
	c.errorf(path, "%v", err)
}

// walk visits every message under m and, for each Any, unpacks it with the
// registered type and validates it, recursively: PGV's generated
// validators stop at Any fields, Envoy does not.
func (c *checker) walk(path string, m protoreflect.Message) {
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			c.errorf(path, "typed_config %q: %v", a.GetTypeUrl(), err)
			return
		}
		if v, ok := inner.(interface{ ValidateAll() error }); ok {
			if err := v.ValidateAll(); err != nil {
				c.validationErrors(path+"<"+string(inner.ProtoReflect().Descriptor().FullName())+">", err)
			}
		}
		c.walk(path, inner.ProtoReflect())
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		name := join(path, string(fd.Name()))
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				c.walk(fmt.Sprintf("%s[%d]", name, i), l.Get(i).Message())
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			// In key order, as PGV's validators go: a map's own order
			// changes from run to run, and so would the report.
			entries := v.Map()
			for _, k := range sortedKeys(entries) {
				c.walk(fmt.Sprintf("%s[%s]", name, k.String()), entries.Get(k).Message())
			}
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			c.walk(name, v.Message())
		}
		return true
	})
}

// sortedKeys returns m's keys in order: numbers by value, strings and
// bools by their text.
func sortedKeys(m protoreflect.Map) []protoreflect.MapKey {
	keys := make([]protoreflect.MapKey, 0, m.Len())
	m.Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool {
		keys = append(keys, k)
		return true
	})
	slices.SortFunc(keys, func(a, b protoreflect.MapKey) int {
		switch a.Interface().(type) {
		case int32, int64:
			return cmp.Compare(a.Int(), b.Int())
		case uint32, uint64:
			return cmp.Compare(a.Uint(), b.Uint())
		}
		return cmp.Compare(a.String(), b.String())
	})
	return keys
}

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

// unpack decodes an Any into a message of the wanted type, or returns nil.
func unpack[T proto.Message](a *anypb.Any, m T) (T, bool) {
	if a == nil || !a.MessageIs(m) {
		return m, false
	}
	if err := a.UnmarshalTo(m); err != nil {
		return m, false
	}
	return m, true
}

// crossReferences checks what Envoy checks only when it builds its
// listeners and clusters, plus what vgw needs of the ext_proc filter.
func (c *checker) crossReferences(b *bootstrapv3.Bootstrap) {
	clusters := map[string]*clusterv3.Cluster{}
	for i, cl := range b.GetStaticResources().GetClusters() {
		path := fmt.Sprintf("static_resources.clusters[%d]", i)
		if _, dup := clusters[cl.GetName()]; dup {
			c.errorf(path, "duplicate cluster name %q", cl.GetName())
		}
		clusters[cl.GetName()] = cl
	}
	env := &bootEnv{clusters: clusters, usesXDS: b.GetDynamicResources() != nil, node: b.GetNode().GetId()}

	// Every gRPC service Envoy itself dials (ADS, xDS sources) must name a
	// static cluster that speaks HTTP/2: those streams start before CDS
	// can deliver one.
	for _, ref := range envoyGrpcRefs("dynamic_resources", b.GetDynamicResources().ProtoReflect()) {
		switch cl := clusters[ref.cluster]; {
		case cl == nil:
			c.errorf(ref.path, "cluster %q is not a static cluster", ref.cluster)
		case !speaksHTTP2(cl):
			c.errorf(ref.path, "cluster %q must speak HTTP/2 for gRPC", ref.cluster)
		}
	}
	if dr := b.GetDynamicResources(); dr != nil {
		if b.GetNode().GetId() == "" {
			c.errorf("node.id", "an Envoy that uses xDS must have a node id")
		}
		// vgw serves clusters over ADS only, and names ADS as their EDS
		// source.
		if dr.GetCdsConfig().GetAds() == nil {
			c.errorf("dynamic_resources.cds_config", "must be ads: {}: vgw's xDS serves the model clusters over ADS")
		}
	}

	listeners := map[string]bool{}
	for i, l := range b.GetStaticResources().GetListeners() {
		path := fmt.Sprintf("static_resources.listeners[%d]", i)
		if listeners[l.GetName()] {
			c.errorf(path, "duplicate listener name %q", l.GetName())
		}
		listeners[l.GetName()] = true
		c.listener(path, l, env)
	}
}

type grpcRef struct{ path, cluster string }

// envoyGrpcRefs finds every envoy_grpc.cluster_name under m.
func envoyGrpcRefs(path string, m protoreflect.Message) []grpcRef {
	var refs []grpcRef
	var visit func(path string, m protoreflect.Message)
	visit = func(path string, m protoreflect.Message) {
		if m.Descriptor().FullName() == "envoy.config.core.v3.GrpcService.EnvoyGrpc" {
			cn := m.Descriptor().Fields().ByName("cluster_name")
			refs = append(refs, grpcRef{join(path, "cluster_name"), m.Get(cn).String()})
			return
		}
		m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			name := join(path, string(fd.Name()))
			switch {
			case fd.IsList() && fd.Message() != nil:
				for i := 0; i < v.List().Len(); i++ {
					visit(fmt.Sprintf("%s[%d]", name, i), v.List().Get(i).Message())
				}
			case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
				visit(name, v.Message())
			}
			return true
		})
	}
	if m.IsValid() {
		visit(path, m)
	}
	return refs
}

// bootEnv is what the checks of a listener need to know of the bootstrap.
type bootEnv struct {
	clusters map[string]*clusterv3.Cluster // the static ones
	usesXDS  bool
	node     string
}

func (c *checker) listener(path string, l *listenerv3.Listener, env *bootEnv) {
	for i, fc := range l.GetFilterChains() {
		for j, f := range fc.GetFilters() {
			fpath := fmt.Sprintf("%s.filter_chains[%d].filters[%d]", path, i, j)
			hcm, ok := unpack(f.GetTypedConfig(), &hcmv3.HttpConnectionManager{})
			if !ok {
				continue
			}
			c.httpConnectionManager(fpath+".typed_config", hcm, env)
		}
	}
}

// RouterFilter and ExtProcFilter are the filters' canonical names.
const (
	RouterFilter  = "envoy.filters.http.router"
	ExtProcFilter = "envoy.filters.http.ext_proc"
)

func (c *checker) httpConnectionManager(path string, hcm *hcmv3.HttpConnectionManager, env *bootEnv) {
	filters := hcm.GetHttpFilters()
	if len(filters) == 0 {
		c.errorf(path+".http_filters", "no HTTP filters: requests would never reach a router")
	}
	for i, f := range filters {
		fpath := fmt.Sprintf("%s.http_filters[%d]", path, i)
		isRouter := f.GetName() == RouterFilter || strings.HasSuffix(f.GetTypedConfig().GetTypeUrl(), "envoy.extensions.filters.http.router.v3.Router")
		if isRouter && i != len(filters)-1 {
			c.errorf(fpath, "the router filter must be the last HTTP filter")
		}
		if !isRouter && i == len(filters)-1 {
			c.errorf(fpath, "the last HTTP filter must be the router (%s)", RouterFilter)
		}
		if ep, ok := unpack(f.GetTypedConfig(), &extprocv3.ExternalProcessor{}); ok {
			c.extProc(fpath+".typed_config", ep, hcm, env)
			c.pathPolicy(path, hcm, f.GetName())
		}
	}

	// Static routes to a named cluster are resolved when the route table
	// loads, before CDS has delivered anything: validate_clusters defaults
	// to true for a route_config inside the connection manager
	// (route.proto).
	validate := hcm.GetRouteConfig().GetValidateClusters() == nil || hcm.GetRouteConfig().GetValidateClusters().GetValue()
	for vi, vh := range hcm.GetRouteConfig().GetVirtualHosts() {
		for ri, r := range vh.GetRoutes() {
			rpath := fmt.Sprintf("%s.route_config.virtual_hosts[%d].routes[%d].route", path, vi, ri)
			if name := r.GetRoute().GetCluster(); name != "" && env.clusters[name] == nil && validate {
				c.errorf(rpath+".cluster", "cluster %q is not defined", name)
			}
			for wi, wc := range r.GetRoute().GetWeightedClusters().GetClusters() {
				if env.clusters[wc.GetName()] == nil && validate {
					c.errorf(fmt.Sprintf("%s.weighted_clusters.clusters[%d]", rpath, wi), "cluster %q is not defined", wc.GetName())
				}
			}
		}
	}
}
