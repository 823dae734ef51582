package admin

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/protobuf/encoding/protojson"
)

// HTTPOptions shape the HTTP pages.
type HTTPOptions struct {
	// Token, when set, guards /status as it guards the admin RPCs.
	// /metrics, /healthz and /readyz stay open for probes and scrapers.
	Token string
	// Ready says why vgw is not ready to serve (starting, draining,
	// shutting down), or nil when it is.
	Ready func() error
}

// Handler serves /metrics, /status, /healthz and /readyz.
func Handler(svc *Service, m *Metrics, o HTTPOptions) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry}))
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		if o.Token != "" && !bearer(r, o.Token) {
			w.Header().Set("WWW-Authenticate", "Bearer")
			http.Error(w, "the status page needs Authorization: Bearer <token> (see --admin-token-file)", http.StatusUnauthorized)
			return
		}
		b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(svc.Status())
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(b)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if o.Ready != nil {
			if err := o.Ready(); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		w.Write([]byte("ready\n"))
	})
	return mux
}

func bearer(r *http.Request, token string) bool {
	got, ok := bearerToken(r.Header.Get("Authorization"))
	return ok && tokenMatches(got, token)
}
