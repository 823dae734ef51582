package main

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"github.com/vgw-project/vgw/config"
	"github.com/vgw-project/vgw/envoy"
	"github.com/vgw-project/vgw/extproc"
)

// validate checks a config file and prints every problem as file:line.
func validate(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("validate", stderr)
	path := fs.String("config", "", "the config file to check")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *path == "" {
		fmt.Fprintln(stderr, "vgw validate: --config is required")
		return errUsage
	}
	c, err := config.Load(*path)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s: ok: %d models, runtime %s\n", *path, len(c.Models), c.Runtime.Kind)
	shared := c.SharedRepos()
	for _, repo := range slices.Sorted(maps.Keys(shared)) {
		fmt.Fprintf(stdout, "%s: note: repo %s is loaded by models %s, so it names none of them: a request naming it gets 404 (clients name each by its key or an alias)\n",
			*path, repo, strings.Join(shared[repo], ", "))
	}
	return nil
}

// envoyCheck checks Envoy bootstraps: against Envoy's API, the references
// Envoy resolves at load time, what vgw needs of its ext_proc filter, and,
// with --config, the settings that must match vgw's config.
func envoyCheck(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("envoy-check", stderr)
	cfgPath := fs.String("config", "", "a vgw config whose Envoy settings the bootstraps must match")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fmt.Fprintln(stderr, "vgw envoy-check: name at least one Envoy bootstrap file")
		return errUsage
	}
	var want *envoy.Expect
	if *cfgPath != "" {
		c, err := config.Load(*cfgPath)
		if err != nil {
			return err
		}
		want = &envoy.Expect{
			MessageTimeout:    c.Envoy.MessageTimeout.Std(),
			MaxMessageTimeout: c.Envoy.MaxMessageTimeout.Std(),
			MaxBodyBytes:      int64(c.MaxBodyBytes),
			MaxAudioBodyBytes: int64(c.MaxAudioBodyBytes),
			RecvLimit:         int64(extproc.RecvLimit(int(max(c.MaxBodyBytes, c.MaxAudioBodyBytes)))),
			StreamIdleTimeout: c.Envoy.StreamIdleTimeout.Std(),
			TrustModelHeader:  c.TrustModelHeader,
		}
		if len(c.Objectives) > 0 { // else the header sets nothing
			want.ObjectiveHeader = c.ObjectiveHeader
		}
	}
	failed := 0
	for _, path := range fs.Args() {
		b, err := envoy.Load(path)
		if err != nil {
			fmt.Fprintln(stdout, err)
			failed++
			continue
		}
		problems := envoy.Check(b)
		if want != nil {
			problems = append(problems, envoy.CheckAgainst(b, *want)...)
		}
		for _, p := range problems {
			fmt.Fprintf(stdout, "%s: %s\n", path, p)
		}
		if len(envoy.Errors(problems)) > 0 {
			failed++
			continue
		}
		fmt.Fprintf(stdout, "%s: ok\n", path)
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d Envoy configs failed the check", failed, fs.NArg())
	}
	return nil
}
