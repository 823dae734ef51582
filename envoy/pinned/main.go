// Command pinned checks vgw's Envoy bootstraps (envoy/*.yaml) and the xDS
// resources vgw sends (xds/testdata/*.golden.json) against the API of the
// Envoy that the compose files run, as that Envoy would parse them.
//
// The main module cannot do this itself: its dependencies (grpc) hold its
// go-control-plane/envoy at v1.40, whose protos accept fields an older
// Envoy refuses. This is a module of its own, outside the main module's
// build, so that it can be built with the go-control-plane/envoy release
// of the Envoy that compose pins; it refuses to run when the two differ.
// `make envoy-api` runs it.
//
// Usage:
//
//	pinned -compose docker-compose.yaml,docker-compose.sim.yaml envoy/*.yaml xds/testdata/*.golden.json
//
// A .yaml, .yml or .json file is a bootstrap, unless it is a JSON object
// whose keys are all xDS type URLs, each holding a list of resources, the
// shape of xds/testdata/*.golden.json. Each problem is printed as
// "file: path: message"; the exit status is 1 if there is any, 2 on bad
// usage.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("pinned", flag.ContinueOnError)
	fs.SetOutput(stderr)
	compose := fs.String("compose", "", "comma-separated compose files whose envoyproxy/envoy image sets the Envoy version (required)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: pinned -compose FILE[,FILE...] BOOTSTRAP_OR_XDS_FILE...")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *compose == "" || fs.NArg() == 0 {
		fs.Usage()
		return 2
	}

	var problems []problem
	built, err := builtEnvoyAPI()
	if err != nil {
		problems = append(problems, problem{"envoy/pinned", envoyModule, err.Error()})
	}
	pin, ps := checkCompose(strings.Split(*compose, ","), built)
	problems = append(problems, ps...)

	var sum summary
	for _, path := range fs.Args() {
		problems = append(problems, checkFile(path, &sum)...)
	}

	for _, p := range problems {
		fmt.Fprintln(stdout, p)
	}
	if len(problems) > 0 {
		return 1
	}
	fmt.Fprintf(stdout, "envoy-api: OK: %s valid for Envoy %s (%s in %s; %s %s)\n",
		sum, built.minor, pin.image, *compose, envoyModule, built.version)
	return 0
}

// A problem is one line of the report: file: path: message.
type problem struct {
	file, path, msg string
}

func (p problem) String() string { return p.file + ": " + p.path + ": " + p.msg }

// summary counts what was checked, for the OK line.
type summary struct {
	bootstraps int
	resources  map[string]int // by message name
	order      []string
}

func (s *summary) addResource(name string) {
	if s.resources == nil {
		s.resources = map[string]int{}
	}
	if s.resources[name] == 0 {
		s.order = append(s.order, name)
	}
	s.resources[name]++
}

func (s summary) String() string {
	out := fmt.Sprintf("%d bootstrap(s)", s.bootstraps)
	for _, n := range s.order {
		out += fmt.Sprintf(", %d %s", s.resources[n], n)
	}
	return out
}
