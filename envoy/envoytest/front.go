package envoytest

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"

	"cel.dev/cel-go/cel"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	celv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/filters/cel/v3"
	headermutationv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"

	"github.com/vgw-project/vgw/envoy"
	"github.com/vgw-project/vgw/extproc/extproctest"
)

// front fills in what the connection manager that runs vgw's filter does
// around it: the header_mutation filters before ext_proc, the route
// table, and local_reply_config. What it cannot play faithfully is an
// error, so that a bootstrap a test runs is never played more kindly
// than Envoy would run it.
func front(f *extproctest.Filter, b *bootstrapv3.Bootstrap) error {
	fr, ok := envoy.FrontOf(b)
	if !ok {
		return nil
	}
	strip, err := stripped(fr)
	if err != nil {
		return err
	}
	f.StripHeader = strip
	f.RouteFor = func(path string) extproctest.Route { return routeFor(b, fr, path) }
	replies, err := localReplies(fr.HCM.GetLocalReplyConfig())
	if err != nil {
		return err
	}
	if len(replies) > 0 {
		f.LocalReply = func(status int, details string, body []byte) (int, []byte, string, bool) {
			for _, m := range replies {
				if m.takes(status, details) {
					return m.rewrite(status, details, body)
				}
			}
			return 0, nil, "", false
		}
	}
	return nil
}

// stripped reads the request headers the connection manager's early
// header mutations remove (envoy.StripsEarly: before the route is
// picked). A header_mutation HTTP filter in front of ext_proc is not
// played: it runs after the route is picked, which this harness does not
// model.
func stripped(fr envoy.Front) (func(string) bool, error) {
	for _, hf := range fr.HCM.GetHttpFilters() {
		if _, ok := envoy.Unpack(hf.GetTypedConfig(), &headermutationv3.HeaderMutation{}); ok {
			return nil, fmt.Errorf("envoytest: the header_mutation HTTP filter %q is not played", hf.GetName())
		}
	}
	if len(fr.HCM.GetEarlyHeaderMutationExtensions()) == 0 {
		return nil, nil
	}
	return func(key string) bool { return envoy.StripsEarly(fr.HCM, key) }, nil
}

// routeFor is what the route a request for path takes does with it: no
// route is the router's 404 (route_not_found), a direct_response its own
// answer, and a route that forwards does so with its body limit.
func routeFor(b *bootstrapv3.Bootstrap, fr envoy.Front, path string) extproctest.Route {
	r, _ := envoy.RouteFor(fr.VirtualHost, path)
	switch {
	case r == nil:
		return extproctest.Route{Direct: &extproctest.Response{Status: http.StatusNotFound}}
	case r.GetDirectResponse() != nil:
		d := r.GetDirectResponse()
		resp := &extproctest.Response{Status: int(d.GetStatus()), Body: []byte(d.GetBody().GetInlineString())}
		for _, h := range r.GetResponseHeadersToAdd() {
			resp.Headers = append(resp.Headers, extproctest.Header{Key: h.GetHeader().GetKey(), Value: h.GetHeader().GetValue()})
		}
		return extproctest.Route{Direct: resp, NoExtProc: envoy.ExtProcDisabled(r, fr.ExtProcName)}
	}
	route := extproctest.Route{NoExtProc: envoy.ExtProcDisabled(r, fr.ExtProcName)}
	if vr, ok := envoy.RouteOf(b, path); ok {
		route.BufferLimit = int(vr.BodyBufferLimit)
	}
	return route
}

// mapper is one of local_reply_config's mappers.
type mapper struct {
	takes  func(status int, details string) bool
	status int // the status it sets; 0 keeps the reply's
	format *corev3.SubstitutionFormatString
}

// localReplies reads local_reply_config's mappers, their filters played
// for status codes, and, or, and CEL expressions over the response
// (local_reply.cc: the first mapper whose filter takes the reply wins).
func localReplies(c *hcmv3.LocalReplyConfig) ([]mapper, error) {
	var out []mapper
	for _, m := range c.GetMappers() {
		takes, err := filter(m.GetFilter())
		if err != nil {
			return nil, err
		}
		if m.GetBody() != nil || len(m.GetHeadersToAdd()) > 0 {
			return nil, fmt.Errorf("envoytest: local reply mapper body and headers_to_add are not played")
		}
		format := m.GetBodyFormatOverride()
		if format == nil {
			format = c.GetBodyFormat()
		}
		if format != nil && format.GetJsonFormat() == nil && format.GetTextFormatSource().GetInlineString() == "" || len(format.GetFormatters()) > 0 {
			return nil, fmt.Errorf("envoytest: local reply format %v is not played", format)
		}
		out = append(out, mapper{takes: takes, status: int(m.GetStatusCode().GetValue()), format: format})
	}
	return out, nil
}

func filter(f *accesslogv3.AccessLogFilter) (func(int, string) bool, error) {
	switch s := f.GetFilterSpecifier().(type) {
	case *accesslogv3.AccessLogFilter_StatusCodeFilter:
		c := s.StatusCodeFilter.GetComparison()
		v := int(c.GetValue().GetDefaultValue())
		switch c.GetOp() {
		case accesslogv3.ComparisonFilter_EQ:
			return func(st int, _ string) bool { return st == v }, nil
		case accesslogv3.ComparisonFilter_GE:
			return func(st int, _ string) bool { return st >= v }, nil
		case accesslogv3.ComparisonFilter_LE:
			return func(st int, _ string) bool { return st <= v }, nil
		case accesslogv3.ComparisonFilter_NE:
			return func(st int, _ string) bool { return st != v }, nil
		}
	case *accesslogv3.AccessLogFilter_AndFilter, *accesslogv3.AccessLogFilter_OrFilter:
		subs := f.GetAndFilter().GetFilters()
		and := f.GetAndFilter() != nil
		if !and {
			subs = f.GetOrFilter().GetFilters()
		}
		var fs []func(int, string) bool
		for _, sub := range subs {
			g, err := filter(sub)
			if err != nil {
				return nil, err
			}
			fs = append(fs, g)
		}
		return func(st int, d string) bool {
			for _, g := range fs {
				if g(st, d) != and {
					return !and
				}
			}
			return and
		}, nil
	case *accesslogv3.AccessLogFilter_ExtensionFilter:
		e, ok := envoy.Unpack(s.ExtensionFilter.GetTypedConfig(), &celv3.ExpressionFilter{})
		if !ok {
			break
		}
		return celFilter(e.GetExpression())
	}
	return nil, fmt.Errorf("envoytest: access log filter %v is not played", f)
}

// celFilter compiles a CEL expression over Envoy's response attributes
// code and code_details (attributes.rst), as the CEL extension filter
// evaluates it; an evaluation error is false, as there.
func celFilter(expr string) (func(int, string) bool, error) {
	env, err := cel.NewEnv(cel.Variable("response", cel.MapType(cel.StringType, cel.DynType)))
	if err != nil {
		return nil, err
	}
	ast, iss := env.Compile(expr)
	if iss.Err() != nil {
		return nil, fmt.Errorf("CEL %q: %w", expr, iss.Err())
	}
	prg, err := env.Program(ast)
	if err != nil {
		return nil, err
	}
	return func(status int, details string) bool {
		out, _, err := prg.Eval(map[string]any{"response": map[string]any{"code": int64(status), "code_details": details}})
		return err == nil && out.Value() == true
	}, nil
}

// rewrite formats a reply's body by the mapper's format: the commands
// %LOCAL_REPLY_BODY%, %RESPONSE_CODE% and %RESPONSE_CODE_DETAILS% in
// text or in a JSON format's strings.
func (m mapper) rewrite(status int, details string, body []byte) (int, []byte, string, bool) {
	if m.status != 0 {
		status = m.status
	}
	subst := strings.NewReplacer("%LOCAL_REPLY_BODY%", string(body), "%RESPONSE_CODE%", fmt.Sprint(status), "%RESPONSE_CODE_DETAILS%", details)
	switch {
	case m.format == nil:
		return status, body, "text/plain", true
	case m.format.GetJsonFormat() != nil:
		v := substitute(m.format.GetJsonFormat().AsMap(), subst)
		out, _ := json.Marshal(v)
		return status, out, "application/json", true
	case m.format.GetTextFormatSource().GetInlineString() != "":
		ct := m.format.GetContentType()
		if ct == "" {
			ct = "text/plain"
		}
		return status, []byte(subst.Replace(m.format.GetTextFormatSource().GetInlineString())), ct, true
	}
	return status, body, "text/plain", true // not reached: localReplies refuses other formats
}

func substitute(v any, r *strings.Replacer) any {
	switch v := v.(type) {
	case string:
		return r.Replace(v)
	case map[string]any:
		for k, x := range v {
			v[k] = substitute(x, r)
		}
	case []any:
		for i, x := range v {
			v[i] = substitute(x, r)
		}
	}
	return v
}
