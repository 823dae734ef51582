package main

import (
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net"
	"os"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"

	"github.com/vgw-project/vgw/extproc"
)

// runNoop serves the floor: an ext_proc server with vgw's gRPC settings
// that decides nothing. It answers every message with a constant reply of
// the same kind and shape as vgw's (the admit sets the same three headers
// and clears the route cache), so that Envoy, the wire and the upstream do
// the same work for both servers and only vgw's own work differs.
func runNoop(args []string) error {
	fs := flag.NewFlagSet("vgwload noop", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:0", "listen address")
	maxBody := fs.Int("max-body", 8<<20, "largest request body")
	fs.Parse(args)
	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	g := grpc.NewServer(extproc.GRPCOptions(*maxBody)...)
	extprocv3.RegisterExternalProcessorServer(g, noop{})
	json.NewEncoder(os.Stderr).Encode(map[string]string{"msg": "listening", "extproc": lis.Addr().String()})
	return g.Serve(lis)
}

type noop struct {
	extprocv3.UnimplementedExternalProcessorServer
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
)

func header(k, v string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: k, RawValue: []byte(v)}}
}

func (noop) Process(srv extprocv3.ExternalProcessor_ProcessServer) error {
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
