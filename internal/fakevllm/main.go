package fakevllm

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
)

// Main runs a fake vLLM from command-line flags until SIGINT or SIGTERM,
// and returns the exit status. It prints one JSON line with the listen
// address on stdout once it listens; logs go to stderr.
func Main(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("fakevllm", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var opt Options
	fs.StringVar(&opt.Model, "model", "", "the served model name (required)")
	host := fs.String("host", "127.0.0.1", "listen host")
	port := fs.Int("port", 8000, "listen port; 0 picks a free one")
	listenFD := fs.Int("listen-fd", 0, "serve on this inherited listening socket instead of host:port")
	fs.DurationVar(&opt.StartupDelay, "startup-delay", 0, "how long /health answers 503 before the server is ready")
	fs.Float64Var(&opt.TokensPerSecond, "tokens-per-second", 0, "generation rate per request; 0 is instant")
	fs.IntVar(&opt.MaxNumSeqs, "max-num-seqs", 0, "requests generating at once; more wait (0: no cap)")
	fs.BoolVar(&opt.FailStart, "fail-start", false, "exit with an error after the startup delay instead of becoming ready")
	fs.IntVar(&opt.CrashAfter, "crash-after", 0, "die when the Nth request starts (0: never)")
	fs.DurationVar(&opt.SlowHealth, "slow-health", 0, "delay every /health answer")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if opt.Model == "" {
		fmt.Fprintln(stderr, "fakevllm: --model is required")
		return 2
	}
	var lis net.Listener
	var err error
	if *listenFD > 0 {
		lis, err = net.FileListener(os.NewFile(uintptr(*listenFD), "listener"))
	} else {
		lis, err = net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*port)))
	}
	if err != nil {
		fmt.Fprintln(stderr, "fakevllm:", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	opt.Log = slog.New(slog.NewTextHandler(stderr, nil))
	if vllmArgs := fs.Args(); len(vllmArgs) > 0 {
		// vLLM logs the arguments it was given as it starts; so does the
		// fake, arguments that may hold a credential (--api-key) included,
		// so that vgw's masking of what a server logs can be tested.
		opt.Log.Info("non-default args", "args", strings.Join(vllmArgs, " "))
	}
	opt.Exit = os.Exit
	json.NewEncoder(stdout).Encode(map[string]string{"msg": "listening", "addr": lis.Addr().String()})
	if err := New(opt).Serve(ctx, lis); err != nil {
		fmt.Fprintln(stderr, "fakevllm:", err)
		return 1
	}
	return 0
}
