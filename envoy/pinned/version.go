package main

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"runtime/debug"
	"sort"
	"strings"

	"sigs.k8s.io/yaml"
)

const envoyModule = "github.com/envoyproxy/go-control-plane/envoy"

// apiVersion is a go-control-plane/envoy release, or an Envoy image's tag.
type apiVersion struct {
	version string // v1.39.0
	minor   string // 1.39: the API; a patch release does not change it
}

// releaseRE matches a release version only: a pseudo-version such as
// v1.39.1-0.20260101000000-abcdef123456 is a commit between releases and
// may already carry the next Envoy's API.
var releaseRE = regexp.MustCompile(`^v(\d+)\.(\d+)\.(\d+)$`)

// builtEnvoyAPI returns the go-control-plane/envoy release this program
// was built with, read from its build information (present in go build,
// go run and go test binaries alike).
func builtEnvoyAPI() (apiVersion, error) {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return apiVersion{}, errors.New("this binary has no build information: build it with go build, go run or go test inside envoy/pinned")
	}
	for _, d := range bi.Deps {
		if d.Path != envoyModule {
			continue
		}
		if d.Replace != nil {
			d = d.Replace
		}
		m := releaseRE.FindStringSubmatch(d.Version)
		if m == nil {
			return apiVersion{}, fmt.Errorf("built with %s %q, not a release: require a vX.Y.Z release in envoy/pinned/go.mod, that of the Envoy compose pins", envoyModule, d.Version)
		}
		return apiVersion{version: d.Version, minor: m[1] + "." + m[2]}, nil
	}
	return apiVersion{}, fmt.Errorf("%s is not among this binary's dependencies", envoyModule)
}

// imageRE finds an Envoy image with a version tag, e.g.
// envoyproxy/envoy:v1.39.6 or envoyproxy/envoy:distroless-v1.39.6, also
// inside a ${VAR:-default}.
var imageRE = regexp.MustCompile(`envoyproxy/envoy(?:-[a-z]+)?:(?:[a-z]+-)?(v(\d+)\.(\d+)\.\d+)\b`)

// pinned is one Envoy image found in a compose file.
type pinned struct {
	file, path, image string
	v                 apiVersion
}

// checkCompose finds the envoyproxy/envoy images of the compose files'
// services. They must all name one Envoy version, and its major.minor must
// be that of the go-control-plane/envoy this program is built with
// (built; zero when it could not be read, then that check is skipped).
func checkCompose(files []string, built apiVersion) (pinned, []problem) {
	var found []pinned
	var problems []problem
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			problems = append(problems, problem{f, "-", err.Error()})
			continue
		}
		var doc struct {
			Services map[string]struct {
				Image string `json:"image"`
			} `json:"services"`
		}
		if err := yaml.Unmarshal(data, &doc); err != nil {
			problems = append(problems, problem{f, "-", "parse compose file: " + err.Error()})
			continue
		}
		names := make([]string, 0, len(doc.Services))
		for n := range doc.Services {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			img := doc.Services[n].Image
			path := "services." + n + ".image"
			m := imageRE.FindStringSubmatch(img)
			switch {
			case m != nil:
				found = append(found, pinned{f, path, m[0], apiVersion{m[1], m[2] + "." + m[3]}})
			case strings.Contains(img, "envoyproxy/envoy"):
				problems = append(problems, problem{f, path, fmt.Sprintf("cannot tell the Envoy version of %q: pin an envoyproxy/envoy:vX.Y.Z tag", img)})
			}
		}
	}
	if len(found) == 0 {
		if len(problems) == 0 {
			problems = append(problems, problem{files[0], "services", "no envoyproxy/envoy:vX.Y.Z image in the compose files " + fmt.Sprint(files)})
		}
		return pinned{}, problems
	}
	first := found[0]
	for _, p := range found[1:] {
		if p.v.version != first.v.version {
			problems = append(problems, problem{p.file, p.path, fmt.Sprintf("%s disagrees with %s's %s (%s): pin the same Envoy in every compose file", p.image, first.file, first.image, first.path)})
		}
	}
	if built.version != "" {
		for _, p := range found {
			if p.v.minor != built.minor {
				problems = append(problems, problem{p.file, p.path, fmt.Sprintf(
					"%s is Envoy %s, but envoy/pinned is built with %s %s, Envoy %s's API: "+
						"bump the require in envoy/pinned/go.mod to the newest %s v%s.x release "+
						"(cd envoy/pinned && go get %s@v%s.0 && go mod tidy, then a later v%s.x if there is one), "+
						"or pin the image back to Envoy %s",
					p.image, p.v.minor, envoyModule, built.version, built.minor,
					envoyModule, p.v.minor, envoyModule, p.v.minor, p.v.minor, built.minor)})
			}
		}
	}
	return first, problems
}
