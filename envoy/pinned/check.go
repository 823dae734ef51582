package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"

	// The extensions vgw's bootstraps and xDS resources name in a
	// typed_config (the list envoy/bootstrap.go imports): importing them
	// registers their types, so that their Any values resolve.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/filters/cel/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/buffer/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/cors/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/health_check/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/http/early_header_mutation/header_mutation/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
)

// xdsTypes are the resource types a golden file may hold: what vgw serves.
var xdsTypes = map[string]proto.Message{
	"type.googleapis.com/envoy.config.cluster.v3.Cluster":                &clusterv3.Cluster{},
	"type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": &endpointv3.ClusterLoadAssignment{},
}

// checkFile checks one bootstrap or xDS golden file.
func checkFile(path string, sum *summary) []problem {
	data, err := os.ReadFile(path)
	if err != nil {
		return []problem{{path, "-", err.Error()}}
	}
	// Envoy reads a bootstrap by its extension: YAML is turned into JSON,
	// then JSON into the proto.
	js := data
	switch filepath.Ext(path) {
	case ".json":
	case ".yaml", ".yml":
		if js, err = yaml.YAMLToJSON(data); err != nil {
			return []problem{{path, "-", "parse YAML: " + err.Error()}}
		}
	default:
		return []problem{{path, "-", "not a .yaml, .yml or .json file"}}
	}
	if res, ok := xdsResources(js); ok {
		return checkXDS(path, res, sum)
	}
	sum.bootstraps++
	c := &checker{file: path}
	c.message("Bootstrap", js, &bootstrapv3.Bootstrap{})
	return c.problems
}

// xdsResources returns js as a golden file's resources, by type URL, if
// that is its shape.
func xdsResources(js []byte) (map[string][]json.RawMessage, bool) {
	var res map[string][]json.RawMessage
	if json.Unmarshal(js, &res) != nil || len(res) == 0 {
		return nil, false
	}
	for k := range res {
		if !strings.HasPrefix(k, "type.googleapis.com/") {
			return nil, false
		}
	}
	return res, true
}

func checkXDS(path string, res map[string][]json.RawMessage, sum *summary) []problem {
	c := &checker{file: path}
	urls := make([]string, 0, len(res))
	for u := range res {
		urls = append(urls, u)
	}
	sort.Strings(urls)
	for _, u := range urls {
		want, ok := xdsTypes[u]
		if !ok {
			c.errorf(u, "not a resource type vgw sends (a Cluster or ClusterLoadAssignment); add it to xdsTypes in envoy/pinned if vgw now sends it")
			continue
		}
		name := string(want.ProtoReflect().Descriptor().Name())
		for i, r := range res[u] {
			sum.addResource(name)
			c.message(fmt.Sprintf("%s[%d]", name, i), r, want.ProtoReflect().New().Interface())
		}
	}
	return c.problems
}

// checker collects one file's problems.
//
// Its walk repeats the one in envoy/bootstrap.go rather than sharing it:
// importing the main module from here would bring in its go.mod, and MVS
// would raise go-control-plane/envoy to the main module's v1.40 — the very
// version this module exists to avoid.
type checker struct {
	file     string
	problems []problem
}

func (c *checker) errorf(path, format string, args ...any) {
	c.problems = append(c.problems, problem{c.file, path, fmt.Sprintf(format, args...)})
}

// message decodes js into m as Envoy does — unknown fields are errors and
// every Any must resolve to a registered type — then validates it.
func (c *checker) message(path string, js []byte, m proto.Message) {
	if err := (protojson.UnmarshalOptions{DiscardUnknown: false}).Unmarshal(js, m); err != nil {
		c.errorf(path, "%v", err)
		return
	}
	c.validate(path, m)
	c.walk(path, m.ProtoReflect())
}

// validate runs m's protoc-gen-validate rules, one problem per violation.
func (c *checker) validate(path string, m proto.Message) {
	v, ok := m.(interface{ ValidateAll() error })
	if !ok {
		return
	}
	err := v.ValidateAll()
	if err == nil {
		return
	}
	var multi interface{ AllErrors() []error }
	if errors.As(err, &multi) {
		for _, e := range multi.AllErrors() {
			c.errorf(path, "%v", e)
		}
		return
	}
	c.errorf(path, "%v", err)
}

// walk finds every Any under m, unpacks and validates it, recursively:
// protoc-gen-validate's generated validators stop at an Any, Envoy does not.
func (c *checker) walk(path string, m protoreflect.Message) {
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			c.errorf(path, "%q: %v", a.GetTypeUrl(), err)
			return
		}
		path += "<" + string(inner.ProtoReflect().Descriptor().Name()) + ">"
		c.validate(path, inner)
		c.walk(path, inner.ProtoReflect())
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		name := path + "." + string(fd.Name())
		switch {
		case fd.IsList() && fd.Message() != nil:
			for i := 0; i < v.List().Len(); i++ {
				c.walk(fmt.Sprintf("%s[%d]", name, i), v.List().Get(i).Message())
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			var keys []protoreflect.MapKey
			v.Map().Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool {
				keys = append(keys, k)
				return true
			})
			// In key order, so that the report is the same every run.
			sort.Slice(keys, func(i, j int) bool { return keys[i].String() < keys[j].String() })
			for _, k := range keys {
				c.walk(fmt.Sprintf("%s[%s]", name, k.String()), v.Map().Get(k).Message())
			}
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			c.walk(name, v.Message())
		}
		return true
	})
}
