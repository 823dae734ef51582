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
	"slices"
	"strconv"
	"strings"
	"syscall"
)

// Main runs a fake vLLM from command-line flags until SIGINT or SIGTERM,
// and returns the exit status. It prints one JSON line with the listen
// address on stdout once it listens; logs go to stderr.
//
// It takes vLLM's own server flags too, so that it can stand in for the
// vLLM image in a container: --model is the repo and, without
// --served-model-name, the served name; the memory and parallelism flags
// are accepted and ignored, and so is any other flag it does not know
// (logged). Each of its own flags also comes from the environment
// (FAKEVLLM_STARTUP_DELAY=5s, FAKEVLLM_FAIL_START=true,
// FAKEVLLM_READY_ON_SIGNAL=USR1, ...), which is how a container's
// behaviour is set.
func Main(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("fakevllm", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var opt Options
	repo := fs.String("model", "", "the model (vLLM's repo); also the served name unless --served-model-name is given (required)")
	host := fs.String("host", "127.0.0.1", "listen host")
	port := fs.Int("port", 8000, "listen port; 0 picks a free one")
	listenFD := fs.Int("listen-fd", 0, "serve on this inherited listening socket instead of host:port")
	fs.DurationVar(&opt.StartupDelay, "startup-delay", 0, "how long /health answers 503 before the server is ready")
	fs.Float64Var(&opt.TokensPerSecond, "tokens-per-second", 0, "generation rate per request; 0 is instant")
	fs.IntVar(&opt.MaxNumSeqs, "max-num-seqs", 0, "requests generating at once; more wait (0: no cap)")
	fs.BoolVar(&opt.FailStart, "fail-start", false, "exit with an error after the startup delay instead of becoming ready")
	fs.IntVar(&opt.CrashAfter, "crash-after", 0, "die when the Nth request starts (0: never)")
	fs.IntVar(&opt.CrashMidStream, "crash-mid-stream", 0, "die halfway through the Nth response (0: never)")
	fs.DurationVar(&opt.SlowHealth, "slow-health", 0, "delay every /health answer")
	readyOn := fs.String("ready-on-signal", "", "stay loading after the startup delay until the process gets this signal (USR1 or USR2)")
	// vLLM's flags that vgw sets and the fake has no use for.
	for _, name := range []string{"gpu-memory-utilization", "tensor-parallel-size", "max-model-len", "quantization", "dtype", "api-key"} {
		fs.String(name, "", "vLLM's; ignored")
	}
	fs.Bool("enable-lora", false, "vLLM's; implied by --lora-modules")
	fs.BoolVar(&opt.SleepMode, "enable-sleep-mode", false, "vLLM's: /sleep works (its endpoints need VLLM_SERVER_DEV_MODE=1)")
	fs.DurationVar(&opt.SleepDelay, "sleep-delay", 0, "how long falling asleep takes")
	fs.DurationVar(&opt.WakeDelay, "wake-delay", 0, "how long bringing the weights back takes (level 1 wake_up, level 2 reload_weights)")
	if err := fromEnv(fs); err != nil {
		fmt.Fprintln(stderr, "fakevllm:", err)
		return 2
	}
	// vLLM's list flags take every value up to the next flag; Go's flag
	// package would stop at the second. They are taken out first, from
	// the vLLM arguments the sim runtime passes after "--" too.
	rest, lists := takeLists(args, "--served-model-name", "--lora-modules")
	ignored, err := parseLenient(fs, rest)
	if err != nil {
		return 2
	}
	opt.Root = *repo
	// vLLM's own switches, wherever they are (the sim runtime passes
	// vLLM's arguments after "--").
	opt.SleepMode = opt.SleepMode || slices.Contains(args, "--enable-sleep-mode")
	opt.DevMode = os.Getenv("VLLM_SERVER_DEV_MODE") == "1"
	if served := lists["--served-model-name"]; len(served) > 0 {
		opt.Model, opt.Aliases = served[0], served[1:]
	} else {
		opt.Model = *repo
	}
	for _, m := range lists["--lora-modules"] {
		name, source, ok := strings.Cut(m, "=")
		if !ok || name == "" {
			fmt.Fprintf(stderr, "fakevllm: --lora-modules %q is not NAME=SOURCE\n", m)
			return 2
		}
		if opt.Adapters == nil {
			opt.Adapters = map[string]string{}
		}
		opt.Adapters[name] = source
	}
	if opt.Model == "" {
		fmt.Fprintln(stderr, "fakevllm: --model is required")
		return 2
	}
	if *readyOn != "" {
		sig, err := parseSignal(*readyOn)
		if err != nil {
			fmt.Fprintln(stderr, "fakevllm: --ready-on-signal:", err)
			return 2
		}
		// Caught before the server listens, so that a signal sent once
		// /health answers is never lost: Go ignores SIGUSR1 and SIGUSR2
		// that nobody asked for.
		got := make(chan os.Signal, 1)
		signal.Notify(got, sig)
		ready := make(chan struct{})
		go func() { <-got; close(ready) }()
		opt.ReadyOn = ready
	}
	var lis net.Listener
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
	// vLLM logs the arguments it was given as it starts; so does the fake,
	// credentials (--api-key) included, so that vgw's masking of what a
	// server logs can be tested. (The sim runtime passes vLLM's arguments
	// after "--".)
	if i := slices.Index(args, "--"); i >= 0 {
		opt.Log.Info("non-default args", "args", strings.Join(args[i+1:], " "))
	} else {
		opt.Log.Info("non-default args", "args", strings.Join(args, " "))
	}
	if len(ignored) > 0 {
		opt.Log.Warn("ignoring flags the fake does not know", "flags", strings.Join(ignored, " "))
	}
	opt.Exit = os.Exit
	json.NewEncoder(stdout).Encode(map[string]string{"msg": "listening", "addr": lis.Addr().String()})
	if err := New(opt).Serve(ctx, lis); err != nil {
		fmt.Fprintln(stderr, "fakevllm:", err)
		return 1
	}
	return 0
}

// fromEnv sets each flag from FAKEVLLM_<NAME> where that is set.
func fromEnv(fs *flag.FlagSet) error {
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		env := "FAKEVLLM_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(env); ok && err == nil {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s=%q: %w", env, v, e)
			}
		}
	})
	return err
}

// takeLists takes vLLM's list flags (each of names, with every value
// that follows it up to the next flag, or written --name=value) out of
// args, and returns the rest and the values of each. A flag given twice
// keeps the values of the last, as in vLLM's argparse.
func takeLists(args []string, names ...string) (rest []string, lists map[string][]string) {
	lists = map[string][]string{}
	for i := 0; i < len(args); i++ {
		name, value, hasValue := strings.Cut(args[i], "=")
		if !slices.Contains(names, name) {
			rest = append(rest, args[i])
			continue
		}
		var values []string
		if hasValue {
			values = append(values, value)
		}
		for i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
			i++
			values = append(values, args[i])
		}
		lists[name] = values
	}
	return rest, lists
}

// parseLenient parses args, dropping (and returning) flags fs does not
// define, with their value when one follows, as vLLM has many more flags
// than the fake.
func parseLenient(fs *flag.FlagSet, args []string) (ignored []string, err error) {
	out := fs.Output()
	fs.SetOutput(io.Discard)
	defer fs.SetOutput(out)
	for {
		err := fs.Parse(args)
		if err == nil {
			return ignored, nil
		}
		name, unknown := strings.CutPrefix(err.Error(), "flag provided but not defined: -")
		if !unknown {
			fmt.Fprintln(out, "fakevllm:", err)
			return nil, err
		}
		i := slices.IndexFunc(args, func(a string) bool {
			n, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
			return strings.HasPrefix(a, "-") && n == name
		})
		if i < 0 {
			return nil, err
		}
		drop := 1
		if !strings.Contains(args[i], "=") && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
			drop = 2
		}
		ignored = append(ignored, args[i:i+drop]...)
		args = slices.Delete(slices.Clone(args), i, i+drop)
	}
}
