package admin

import (
	"context"
	"crypto/subtle"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	adminv1 "github.com/vgw-project/vgw/proto/adminv1"
)

// ReadToken reads an admin token from a file: its first line, trimmed. An
// empty file is an error, not an open door.
func ReadToken(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("admin token: %w", err)
	}
	tok, _, _ := strings.Cut(string(data), "\n")
	tok = strings.TrimSpace(tok)
	if tok == "" {
		return "", fmt.Errorf("admin token file %s is empty", path)
	}
	return tok, nil
}

// guarded reports whether method needs the token: every Admin RPC does;
// health checks and server reflection do not, so that probes and
// `grpcurl list` work without it.
func guarded(method string) bool {
	return strings.HasPrefix(method, "/"+adminv1.Admin_ServiceDesc.ServiceName+"/")
}

// authorized checks the request's `authorization: Bearer TOKEN` in
// constant time.
func authorized(ctx context.Context, token string) error {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		got, ok := strings.CutPrefix(v, "Bearer ")
		if ok && subtle.ConstantTimeCompare([]byte(got), []byte(token)) == 1 {
			return nil
		}
	}
	// Never echo what was sent: it may be someone's real token.
	return status.Error(codes.Unauthenticated, "the admin service needs authorization: Bearer <token> (see --admin-token-file)")
}

// TokenAuth returns interceptors that require token on every Admin RPC.
func TokenAuth(token string) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
			if guarded(info.FullMethod) {
				if err := authorized(ctx, token); err != nil {
					return nil, err
				}
			}
			return next(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, next grpc.StreamHandler) error {
			if guarded(info.FullMethod) {
				if err := authorized(ss.Context(), token); err != nil {
					return err
				}
			}
			return next(srv, ss)
		}),
	}
}
