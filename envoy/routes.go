package envoy

import (
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strings"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	earlyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/early_header_mutation/header_mutation/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// InferencePaths are the OpenAI and vLLM endpoints clients call, which
// must reach vgw (and through it, the model servers), and what vgw
// answers itself (the model list and cards, its health). A shipped
// bootstrap routes each of them to the cluster vgw names.
var InferencePaths = []string{
	"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
	"/v1/audio/transcriptions", "/v1/audio/translations",
	"/v1/rerank", "/v2/rerank", "/rerank", "/v1/score", "/score",
	"/tokenize", "/detokenize", "/pooling", "/classify",
	"/v1/models", "/v1/models/org/model", "/health",
}

// AudioPaths are the inference endpoints that take uploads (multipart
// form data), whose bodies may be larger than JSON ones.
var AudioPaths = []string{"/v1/audio/transcriptions", "/v1/audio/translations"}

// BackendOnlyPaths are vLLM's admin and development endpoints: they put
// a model to sleep, run code in its workers, load adapters, profile it,
// or tell about its host. No client may reach them through Envoy.
var BackendOnlyPaths = []string{
	"/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache", "/reset_mm_cache",
	"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/start_profile", "/stop_profile",
	"/metrics", "/server_info", "/scale_elastic_ep", "/is_scaling_elastic_ep", "/version", "/ping",
}

// matches reports whether a route's match takes a request for path (its
// :path, query and all), by the path alone: a match that also looks at
// headers, query parameters or more may take fewer, which conditional
// reports. Envoy matches path and safe_regex against the path without
// its query, prefix against the whole (route/config_impl.cc).
func matches(m *routev3.RouteMatch, path string) (ok, conditional bool) {
	bare, _, _ := strings.Cut(path, "?")
	raw := bare // safe_regex ignores case_sensitive
	fold := m.GetCaseSensitive() != nil && !m.GetCaseSensitive().GetValue()
	lower := func(s string) string {
		if fold {
			return strings.ToLower(s)
		}
		return s
	}
	path, bare = lower(path), lower(bare)
	conditional = len(m.GetHeaders()) > 0 || len(m.GetQueryParameters()) > 0 || m.GetGrpc() != nil ||
		m.GetRuntimeFraction() != nil || len(m.GetDynamicMetadata()) > 0 || m.GetFilterState() != nil
	switch p := m.GetPathSpecifier().(type) {
	case *routev3.RouteMatch_Prefix:
		return strings.HasPrefix(path, lower(p.Prefix)), conditional
	case *routev3.RouteMatch_Path:
		return bare == lower(p.Path), conditional
	case *routev3.RouteMatch_PathSeparatedPrefix:
		pre := lower(p.PathSeparatedPrefix)
		return bare == pre || strings.HasPrefix(bare, pre+"/"), conditional
	case *routev3.RouteMatch_SafeRegex:
		re, err := fullRegexp(p.SafeRegex.GetRegex())
		return err == nil && re.MatchString(raw), conditional
	}
	// A path_match_policy extension (URI templates) or none: unknown here.
	return true, true
}

// fullRegexp compiles an Envoy safe_regex, which must match the whole
// value (RE2, as Go's regexp).
func fullRegexp(expr string) (*regexp.Regexp, error) {
	return regexp.Compile(`^(?:` + expr + `)$`)
}

// RouteFor returns the route of vh that a request for path takes (the
// first whose match takes it by its path, unconditionally), and its
// index; nil when none does.
func RouteFor(vh *routev3.VirtualHost, path string) (*routev3.Route, int) {
	for i, r := range vh.GetRoutes() {
		if ok, conditional := matches(r.GetMatch(), path); ok && !conditional {
			return r, i
		}
	}
	return nil, -1
}

// forwards reports whether a route sends requests on to a cluster, and
// whether it is vgw's (cluster_header).
func forwards(r *routev3.Route) (any, vgws bool) {
	ra := r.GetRoute()
	return ra != nil, ra.GetClusterHeader() == ClusterHeader
}

// ExtProcDisabled reports whether a route turns off the ext_proc filter
// named filterName (ext_proc.cc mergePerRouteConfig: ExtProcPerRoute
// disabled).
func ExtProcDisabled(r *routev3.Route, filterName string) bool {
	pr, ok := unpack(r.GetTypedPerFilterConfig()[filterName], &extprocv3.ExtProcPerRoute{})
	return ok && pr.GetDisabled()
}

// pathPolicy checks what the routes of a connection manager that runs
// vgw's ext_proc filter do with each path that matters: vLLM's admin
// endpoints may reach no backend, the inference endpoints should reach
// vgw, and a route that answers by itself should not ask vgw first (vgw
// would admit the request, and load its model, for nothing).
func (c *checker) pathPolicy(path string, hcm *hcmv3.HttpConnectionManager, extprocName string) {
	for vi, vh := range hcm.GetRouteConfig().GetVirtualHosts() {
		vpath := fmt.Sprintf("%s.route_config.virtual_hosts[%d]", path, vi)
		reached := map[int][]string{} // route → the admin paths it sends on
		for _, p := range BackendOnlyPaths {
			for ri, r := range vh.GetRoutes() {
				ok, conditional := matches(r.GetMatch(), p)
				if !ok {
					continue
				}
				if any, _ := forwards(r); any {
					reached[ri] = append(reached[ri], p)
					break
				}
				if !conditional {
					break
				}
			}
		}
		for _, ri := range slices.Sorted(maps.Keys(reached)) {
			c.errorf(fmt.Sprintf("%s.routes[%d]", vpath, ri), "sends %s on to a model server: vLLM's admin and development endpoints, which no client may reach; answer them with a direct_response (404) before this route", strings.Join(reached[ri], ", "))
		}
		for _, p := range InferencePaths {
			r, ri := RouteFor(vh, p)
			if _, vgws := forwards(r); r == nil || !vgws {
				c.warnf(vpath, "a request for %s does not reach vgw (route %d): clients calling it get Envoy's answer", p, ri)
			}
		}
		if !StripsEarly(hcm, ClusterHeader) {
			c.warnf(path+".early_header_mutation_extensions", "a client's own %s is not removed before the route is picked: where vgw never sees a request whole, Envoy routes it where the client chose; remove x-vgw-* there (remove_on_match, prefix x-vgw-)", ClusterHeader)
		}
		for ri, r := range vh.GetRoutes() {
			if any, _ := forwards(r); !any && !ExtProcDisabled(r, extprocName) {
				c.errorf(fmt.Sprintf("%s.routes[%d]", vpath, ri), "answers requests itself, yet vgw's ext_proc filter runs for them first: vgw would admit them, and load their model, for nothing; add typed_per_filter_config %s: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute, disabled: true}", extprocName)
			}
		}
	}
}

// Front is the connection manager of a bootstrap that runs vgw's
// ext_proc filter, as far as a harness playing that Envoy needs it: the
// manager, the virtual host that takes any domain, and the name its
// ext_proc filter goes by.
type Front struct {
	HCM         *hcmv3.HttpConnectionManager
	VirtualHost *routev3.VirtualHost
	ExtProcName string
}

// FrontOf returns the first static connection manager that runs vgw's
// ext_proc filter.
func FrontOf(b *bootstrapv3.Bootstrap) (Front, bool) {
	for _, hcm := range staticHCMs(b) {
		for _, hf := range hcm.GetHttpFilters() {
			if _, ok := unpack(hf.GetTypedConfig(), &extprocv3.ExternalProcessor{}); !ok {
				continue
			}
			for _, vh := range hcm.GetRouteConfig().GetVirtualHosts() {
				if slices.Contains(vh.GetDomains(), "*") {
					return Front{HCM: hcm, VirtualHost: vh, ExtProcName: hf.GetName()}, true
				}
			}
		}
	}
	return Front{}, false
}

// Unpack reads a typed_config as m, and reports whether it is one.
func Unpack[T proto.Message](a *anypb.Any, m T) (T, bool) { return unpack(a, m) }

// StripsEarly reports whether the connection manager removes header from
// every request as it arrives, before the route is picked
// (early_header_mutation_extensions, conn_manager_utility.cc
// mutateRequestHeaders): a remove naming it, or a remove_on_match whose
// matcher takes it. A matcher this check cannot read counts as not.
func StripsEarly(hcm *hcmv3.HttpConnectionManager, header string) bool {
	for _, ext := range hcm.GetEarlyHeaderMutationExtensions() {
		hm, ok := unpack(ext.GetTypedConfig(), &earlyv3.HeaderMutation{})
		if !ok {
			continue
		}
		for _, m := range hm.GetMutations() {
			if strings.EqualFold(m.GetRemove(), header) || stringMatches(m.GetRemoveOnMatch().GetKeyMatcher(), header) {
				return true
			}
		}
	}
	return false
}

// stringMatches plays a StringMatcher on s; false for nil or a pattern
// it does not know.
func stringMatches(m *matcherv3.StringMatcher, s string) bool {
	if m == nil {
		return false
	}
	fold := func(v string) string {
		if m.GetIgnoreCase() {
			return strings.ToLower(v)
		}
		return v
	}
	switch p := m.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		return fold(s) == fold(p.Exact)
	case *matcherv3.StringMatcher_Prefix:
		return strings.HasPrefix(fold(s), fold(p.Prefix))
	case *matcherv3.StringMatcher_Suffix:
		return strings.HasSuffix(fold(s), fold(p.Suffix))
	case *matcherv3.StringMatcher_Contains:
		return strings.Contains(fold(s), fold(p.Contains))
	case *matcherv3.StringMatcher_SafeRegex:
		re, err := fullRegexp(p.SafeRegex.GetRegex())
		return err == nil && re.MatchString(s)
	}
	return false
}
