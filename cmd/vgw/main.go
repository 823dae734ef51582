// Command vgw serves many vLLM models from one GPU box behind Envoy: it is
// Envoy's external processor (admission and routing per model), and the
// control service that moves models on and off the GPUs.
//
//	vgw serve --config FILE        run everything
//	vgw validate --config FILE     check a config; errors as file:line: message
//	vgw envoy-check FILE...        check Envoy bootstraps as Envoy would
//	vgw fakevllm --model NAME      a vLLM stand-in for running without a GPU
//	vgw health                     exit 0 when a vgw here is ready (for container health checks)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/vgw-project/vgw/internal/fakevllm"
)

const usage = `vgw serves many vLLM models from one GPU box behind Envoy.

Usage:
  vgw serve --config FILE [flags]     run the ext_proc service (see vgw serve -h)
  vgw validate --config FILE          check a config file
  vgw envoy-check [--config FILE] ENVOY.yaml...
                                      check Envoy bootstraps, optionally against a vgw config
  vgw fakevllm --model NAME [flags]   a vLLM stand-in (see vgw fakevllm -h)
  vgw health [--url URL]              exit 0 if vgw answers ready (default http://127.0.0.1:9091/readyz)
  vgw version                         print the version
`

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// errUsage marks a command-line mistake: exit status 2.
var errUsage = errors.New("usage")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// run executes one vgw command and returns its exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "serve":
		err = serve(ctx, args[1:], stderr)
	case "validate":
		err = validate(args[1:], stdout, stderr)
	case "envoy-check":
		err = envoyCheck(args[1:], stdout, stderr)
	case "fakevllm":
		return fakevllm.Main(args[1:], stdout, stderr)
	case "health":
		err = healthCheck(ctx, args[1:], stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "vgw", version)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
	default:
		fmt.Fprintf(stderr, "vgw: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errUsage), errors.Is(err, flag.ErrHelp):
		return 2
	default:
		fmt.Fprintln(stderr, "vgw:", err)
		return 1
	}
}

// newFlags returns a flag set that reports its errors to stderr.
func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("vgw "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// parseFlags parses args, mapping a flag mistake to errUsage.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	return nil
}
