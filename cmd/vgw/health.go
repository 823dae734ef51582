package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

// healthCheck asks a vgw's /readyz and succeeds only on 200: a health check
// for images that have no curl (the vgw image is distroless). The address
// comes from --url, else $VGW_HTTP_ADDR (0.0.0.0 asked of 127.0.0.1),
// else the default listener.
func healthCheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("health", stderr)
	url := fs.String("url", "", "the URL to ask (default: /readyz on $VGW_HTTP_ADDR or 127.0.0.1:9091)")
	timeout := fs.Duration("timeout", 3*time.Second, "how long to wait for the answer")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *url == "" {
		*url = "http://" + localAddr(envOr("VGW_HTTP_ADDR", "127.0.0.1:9091")) + "/readyz"
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, *url, nil)
	if err != nil {
		return fmt.Errorf("health: %w", err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("health: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<10))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("health: %s answered %s: %s", *url, resp.Status, strings.TrimSpace(string(body)))
	}
	fmt.Fprint(stdout, string(body))
	return nil
}

// localAddr turns a listen address into one to dial from the same host.
func localAddr(listen string) string {
	for _, any := range []string{"0.0.0.0:", "[::]:", ":"} {
		if port, ok := strings.CutPrefix(listen, any); ok {
			return "127.0.0.1:" + port
		}
	}
	return listen
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
