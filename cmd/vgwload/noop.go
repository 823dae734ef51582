package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/vgw-project/vgw/extproc"
)

// runNoop serves the floor: an ext_proc server with vgw's gRPC settings
// that decides nothing. It answers every message with a constant reply of
// the same kind and shape as vgw's (the admit sets the same three headers
// and clears the route cache), so that Envoy, the wire and the upstream do
// the same work for both servers and only vgw's own work differs.
//
// With --hold it is the floor of vgwload rss instead: it answers a request
// body as vgw answers one whose model is loading (override_message_timeout)
// and then holds the stream until the client closes it, so what gRPC alone
// keeps per waiting stream can be set beside what vgw keeps. --http-addr
// serves the same Go runtime and process metrics as vgw's /metrics, so the
// two can be compared line by line.
func runNoop(args []string) error {
	fs := flag.NewFlagSet("vgwload noop", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:0", "listen address")
	maxBody := fs.Int("max-body", 8<<20, "largest request body")
	hold := fs.Bool("hold", false, "hold each stream after its request body, as vgw holds a request waiting for its model")
	httpAddr := fs.String("http-addr", "", "serve /metrics (Go runtime and process) here; none if empty")
	fs.Parse(args)
	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	served := "" // the /metrics address, reported with the ext_proc one
	if *httpAddr != "" {
		hl, err := net.Listen("tcp", *httpAddr)
		if err != nil {
			return fmt.Errorf("listen for /metrics: %w", err)
		}
		go serveMetrics(hl, log)
		served = hl.Addr().String()
	}
	g := grpc.NewServer(extproc.GRPCOptions(*maxBody)...)
	extprocv3.RegisterExternalProcessorServer(g, noop{hold: *hold})
	log.Info("listening", slog.String("extproc", lis.Addr().String()), slog.String("http", served), slog.Bool("hold", *hold))
	return g.Serve(lis)
}

// serveMetrics serves the collectors vgw's /metrics has besides its own
// (admin.NewMetrics): the Go runtime's and the process's.
func serveMetrics(l net.Listener, log *slog.Logger) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	if err := srv.Serve(l); err != nil {
		log.Error("serving /metrics", slog.Any("err", err))
	}
}

type noop struct {
	extprocv3.UnimplementedExternalProcessorServer
	hold bool // answer the body with noopHold and keep the stream open
}

var (
	noopRequestHeaders = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{}}}
	noopRequestBody    = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{
		HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{
			header(extproc.HeaderModel, "llama-3.1-8b"), header(extproc.HeaderCluster, "model/llama-3.1-8b"), header(extproc.HeaderQueueDepth, "0"),
		}},
		ClearRouteCache: true,
	}}}}
	noopResponseHeaders = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
		HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{header(extproc.HeaderQueueDepth, "0")}},
	}}}}
	noopResponseBody = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{ResponseBody: &extprocv3.BodyResponse{}}}
	noopTrailers     = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{ResponseTrailers: &extprocv3.TrailersResponse{}}}
	noopReqTrailers  = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{RequestTrailers: &extprocv3.TrailersResponse{}}}
	// noopHold is what vgw sends a request that waits for its model
	// (stream.extendTimeout): a timeout override and nothing else.
	noopHold = &extprocv3.ProcessingResponse{OverrideMessageTimeout: durationpb.New(10 * time.Minute)}
)

func header(k, v string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: k, RawValue: []byte(v)}}
}

func (n noop) Process(srv extprocv3.ExternalProcessor_ProcessServer) error {
	for {
		req, err := srv.Recv()
		if errors.Is(err, io.EOF) || err != nil {
			return nil
		}
		var resp *extprocv3.ProcessingResponse
		switch req.GetRequest().(type) {
		case *extprocv3.ProcessingRequest_RequestHeaders:
			resp = noopRequestHeaders
		case *extprocv3.ProcessingRequest_RequestBody:
			if n.hold {
				return holdStream(srv)
			}
			resp = noopRequestBody
		case *extprocv3.ProcessingRequest_RequestTrailers:
			resp = noopReqTrailers
		case *extprocv3.ProcessingRequest_ResponseHeaders:
			resp = noopResponseHeaders
		case *extprocv3.ProcessingRequest_ResponseBody:
			resp = noopResponseBody
		case *extprocv3.ProcessingRequest_ResponseTrailers:
			resp = noopTrailers
		}
		if err := srv.Send(resp); err != nil {
			return nil
		}
	}
}

// holdStream tells Envoy to wait and then waits, as a vgw request whose
// model is loading does: the handler goroutine blocked, nothing read, until
// the client resets the stream (which cancels its context).
func holdStream(srv extprocv3.ExternalProcessor_ProcessServer) error {
	if err := srv.Send(noopHold); err != nil {
		return nil
	}
	<-srv.Context().Done()
	return nil
}
