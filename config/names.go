package config

import (
	"fmt"
	"maps"
	"slices"
	"strings"
)

// NameKind says how a name clients may send relates to the model it names.
type NameKind uint8

const (
	NameKey     NameKind = iota // the model's key under models:
	NameRepo                    // the repo its server loads
	NameAlias                   // one of its aliases
	NameAdapter                 // a LoRA adapter its server loads
)

var nameKinds = [...]string{"key", "repo", "alias", "adapter"}

func (k NameKind) String() string {
	if int(k) < len(nameKinds) {
		return nameKinds[k]
	}
	return "name"
}

// A Name is what one name clients may send stands for.
type Name struct {
	Model string // the configured model it routes to (its key)
	Kind  NameKind
}

// Names maps every name clients may send to what it names: each model's
// key, its repo (plain vLLM serves under it, so clients moving from
// vLLM send it), its aliases and its adapters. Validation refuses a
// name that two models claim, with one exception: a repo that several
// models load (with different settings) names none of them, as it
// cannot say which is meant; their keys and aliases do.
func (c *Config) Names() map[string]Name {
	names := make(map[string]Name, len(c.Models))
	for _, key := range c.ModelNames() {
		m := c.Models[key]
		names[key] = Name{Model: key, Kind: NameKey}
		if m == nil {
			continue
		}
		for _, a := range m.Aliases {
			if _, taken := names[a]; !taken {
				names[a] = Name{Model: key, Kind: NameAlias}
			}
		}
		for _, a := range slices.Sorted(maps.Keys(m.Adapters)) {
			if _, taken := names[a]; !taken {
				names[a] = Name{Model: key, Kind: NameAdapter}
			}
		}
	}
	for repo, models := range c.repos() {
		if _, taken := names[repo]; !taken && len(models) == 1 {
			names[repo] = Name{Model: models[0], Kind: NameRepo}
		}
	}
	return names
}

// SharedRepos returns each repo that more than one model loads, with
// those models, sorted: a name no request can use (see Names).
func (c *Config) SharedRepos() map[string][]string {
	repos := c.repos()
	maps.DeleteFunc(repos, func(_ string, models []string) bool { return len(models) < 2 })
	return repos
}

// repos maps each repo to the models that load it, sorted.
func (c *Config) repos() map[string][]string {
	repos := map[string][]string{}
	for _, key := range c.ModelNames() {
		if m := c.Models[key]; m != nil && m.Repo != "" {
			repos[m.Repo] = append(repos[m.Repo], key)
		}
	}
	return repos
}

// names checks the names clients may send: each well formed, and none
// claimed by two models (see Names). A model's own names may repeat one
// another, except an adapter's, which must differ from the base model's:
// its server would not know which was meant.
func (v *validator) names(c *Config) {
	type owner struct {
		model string
		kind  NameKind
	}
	taken := map[string]owner{}
	for _, key := range c.ModelNames() {
		taken[key] = owner{key, NameKey}
	}
	repos := c.repos()
	claim := func(name string, o owner, at []string) {
		prev, ok := taken[name]
		if o.kind != NameRepo {
			// Another model's repo, whichever order the keys sort in.
			if i := slices.IndexFunc(repos[name], func(m string) bool { return m != o.model }); i >= 0 {
				prev, ok = owner{repos[name][i], NameRepo}, true
			}
		}
		switch {
		case !ok:
			taken[name] = o
		case prev.kind == NameRepo && o.kind == NameRepo:
			// Models that load one repo with different settings: the
			// repo is no one's name (Names), not a clash.
		case prev.model != o.model:
			v.at(at, "%s %s of model %s is already the %s of model %s: a request naming it could mean either", o.kind, trimmed(name), trimmed(o.model), prev.kind, trimmed(prev.model))
		case o.kind == NameAdapter || prev.kind == NameAdapter:
			v.at(at, "adapter %s of model %s has the name of the model itself: its server could not tell which is meant", trimmed(name), trimmed(o.model))
		}
	}
	for _, key := range c.ModelNames() {
		m := c.Models[key]
		if m == nil {
			continue
		}
		// The repo first: an adapter may not take its name either.
		if m.Repo != "" {
			claim(m.Repo, owner{key, NameRepo}, []string{"models", key, "repo"})
		}
		for i, a := range m.Aliases {
			at := []string{"models", key, "aliases", fmt.Sprint(i)}
			if !validName(a) {
				v.at(at, "alias %s must be 1-128 of letters, digits and . _ : @ + / -, start with a letter or digit, and not contain ..", trimmed(a))
				continue
			}
			claim(a, owner{key, NameAlias}, at)
		}
		for _, a := range slices.Sorted(maps.Keys(m.Adapters)) {
			at := []string{"models", key, "adapters", a}
			if !validName(a) {
				v.at(at, "adapter name %s must be 1-128 of letters, digits and . _ : @ + / -, start with a letter or digit, and not contain ..", trimmed(a))
				continue
			}
			if src := m.Adapters[a]; src == "" || strings.ContainsAny(src, "= \t\r\n") || strings.HasPrefix(src, "-") || strings.HasPrefix(src, "{") {
				v.at(at, "adapter %s needs a source: a path on the model server or a Hugging Face repo, without spaces or '=', got %s", trimmed(a), trimmed(src))
			}
			claim(a, owner{key, NameAdapter}, at)
		}
	}
}

// validName reports whether s may be a name clients send.
func validName(s string) bool {
	return ModelNamePattern.MatchString(s) && !strings.Contains(s, "..")
}
