package admin

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
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

// unguarded reports whether method may be called without the token: health
// checks and server reflection, so that probes and `grpcurl list` work.
// Everything else needs it, including any service added later.
func unguarded(method string) bool {
	return strings.HasPrefix(method, "/grpc.health.v1.Health/") ||
		strings.HasPrefix(method, "/grpc.reflection.v1.ServerReflection/") ||
		strings.HasPrefix(method, "/grpc.reflection.v1alpha.ServerReflection/")
}

// bearerToken returns the credentials of an "authorization: Bearer X"
// value; the scheme is case-insensitive (RFC 9110, section 11.1).
func bearerToken(v string) (string, bool) {
	scheme, cred, ok := strings.Cut(strings.TrimSpace(v), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	return strings.TrimSpace(cred), true
}

// tokenMatches compares in constant time, over hashes so that not even the
// token's length shows in the timing.
func tokenMatches(got, token string) bool {
	a, b := sha256.Sum256([]byte(got)), sha256.Sum256([]byte(token))
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1
}

// authorized checks the request's `authorization: Bearer TOKEN`.
func authorized(ctx context.Context, token string) error {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		if got, ok := bearerToken(v); ok && tokenMatches(got, token) {
			return nil
		}
	}
	// Never echo what was sent: it may be someone's real token.
	return status.Error(codes.Unauthenticated, "the admin service needs authorization: Bearer <token> (see --admin-token-file)")
}

// TokenAuth returns interceptors that require token on every RPC but
// health checks and reflection.
func TokenAuth(token string) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
			if !unguarded(info.FullMethod) {
				if err := authorized(ctx, token); err != nil {
					return nil, err
				}
			}
			return next(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, next grpc.StreamHandler) error {
			if !unguarded(info.FullMethod) {
				if err := authorized(ss.Context(), token); err != nil {
					return err
				}
			}
			return next(srv, ss)
		}),
	}
}
