package config

import (
	"maps"
	"reflect"
	"strings"
	"testing"
)

const namesBase = "runtime: {kind: sim}\ngpus: [{name: g, memory: 80GiB}]\n"

// TestNames: every name a client may send routes to its model, and a
// repo two models share routes to neither.
func TestNames(t *testing.T) {
	c, err := Parse("c.yaml", []byte(namesBase+`models:
  llama-8b:
    repo: meta-llama/Llama-3.1-8B-Instruct
    aliases: [gpt-4o-mini, llama]
    adapters: {sql-lora: /loras/sql, tweet: org/tweet-lora}
  llama-8b-long:
    repo: org/shared
  llama-8b-short:
    repo: org/shared
  plain: {repo: plain}
`))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]Name{
		"llama-8b":                         {"llama-8b", NameKey},
		"meta-llama/Llama-3.1-8B-Instruct": {"llama-8b", NameRepo},
		"gpt-4o-mini":                      {"llama-8b", NameAlias},
		"llama":                            {"llama-8b", NameAlias},
		"sql-lora":                         {"llama-8b", NameAdapter},
		"tweet":                            {"llama-8b", NameAdapter},
		"llama-8b-long":                    {"llama-8b-long", NameKey},
		"llama-8b-short":                   {"llama-8b-short", NameKey},
		"plain":                            {"plain", NameKey},
	}
	if got := c.Names(); !maps.Equal(got, want) {
		t.Errorf("names\n%v\nwant\n%v", got, want)
	}
	if got := c.SharedRepos(); !reflect.DeepEqual(got, map[string][]string{"org/shared": {"llama-8b-long", "llama-8b-short"}}) {
		t.Errorf("shared repos %v", got)
	}
}

// TestNameErrors: a name two models claim is refused at its line.
func TestNameErrors(t *testing.T) {
	tests := []struct {
		name, models, want string
	}{
		{"alias is another model's key", "  a: {aliases: [b]}\n  b: {}\n", `c.yaml:4: alias "b" of model "a" is already the key of model "b"`},
		{"alias is another model's repo", "  a:\n    aliases: [x, org/b]\n  b: {repo: org/b}\n", `c.yaml:5: alias "org/b" of model "a" is already the repo of model "b"`},
		// Whichever order the keys sort in.
		{"alias is its own repo, which another model loads too", "  a:\n    repo: org/x\n    aliases: [org/x]\n  b: {repo: org/x}\n", `c.yaml:6: alias "org/x" of model "a" is already the repo of model "b"`},
		{"the same, sorted the other way", "  z:\n    repo: org/x\n    aliases: [org/x]\n  b: {repo: org/x}\n", `c.yaml:6: alias "org/x" of model "z" is already the repo of model "b"`},
		{"alias of two models", "  a: {aliases: [gpt]}\n  b:\n    aliases: [gpt]\n", `c.yaml:6: alias "gpt" of model "b" is already the alias of model "a"`},
		{"adapter is another model's alias", "  a: {aliases: [sql]}\n  b:\n    adapters:\n      sql: /l/sql\n", `c.yaml:7: adapter "sql" of model "b" is already the alias of model "a"`},
		{"repo is another model's key", "  a: {}\n  b: {repo: a}\n", `c.yaml:5: repo "a" of model "b" is already the key of model "a"`},
		{"adapter named as its model", "  a:\n    aliases: [x]\n    adapters: {x: /l/x}\n", `c.yaml:6: adapter "x" of model "a" has the name of the model itself`},
		{"adapter named as its repo", "  a:\n    repo: org/a\n    adapters:\n      org/a: /l/x\n", `c.yaml:7: adapter "org/a" of model "a" has the name of the model itself`},
		{"adapter without source", "  a:\n    adapters: {x: \"\"}\n", `c.yaml:5: adapter "x" needs a source`},
		{"adapter source with =", "  a:\n    adapters: {x: a=b}\n", `c.yaml:5: adapter "x" needs a source`},
		{"bad alias", "  a:\n    aliases: [\"has space\"]\n", `c.yaml:5: alias "has space" must be`},
		{"served names in extra_args", "  a:\n    extra_args: [--served-model-name, x]\n", `c.yaml:5: extra_args may not set --served-model-name: vgw manages it from the model's key, aliases and repo (use aliases)`},
		{"lora modules in extra_args", "  a:\n    extra_args: [--lora-modules, x=y]\n", `c.yaml:5: extra_args may not set --lora-modules: vgw manages it from the model's adapters (use adapters)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("c.yaml", []byte(namesBase+"models:\n"+tt.models))
			if err == nil {
				t.Fatal("Parse accepted the config")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error:\n%v\nwant it to contain %q", err, tt.want)
			}
		})
	}
}

// TestNamesRepeatedWithinModel: a model may list a name it already has
// (its repo as an alias); that is no clash.
func TestNamesRepeatedWithinModel(t *testing.T) {
	c, err := Parse("c.yaml", []byte(namesBase+"models:\n  a: {repo: org/a, aliases: [org/a, a, b, b]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Names(); len(got) != 3 || got["b"] != (Name{"a", NameAlias}) || got["org/a"].Model != "a" {
		t.Errorf("names %v", got)
	}
}

// TestRequestDefaults: a model's request defaults are the gateway's with
// its own over them; "model" is default_model's, which must name a model.
func TestRequestDefaults(t *testing.T) {
	c, err := Parse("c.yaml", []byte(namesBase+`request_defaults: {temperature: 0.2, stop: ["\n"]}
default_model: gpt
models:
  a: {aliases: [gpt], request_defaults: {temperature: 0.7, chat_template_kwargs: {enable_thinking: false}}}
  b: {}
`))
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{
		"a": `{"chat_template_kwargs":{"enable_thinking":false},"stop":["\n"],"temperature":0.7}`,
		"b": `{"stop":["\n"],"temperature":0.2}`,
	} {
		if got, err := c.RequestDefaultsOf(name); err != nil || string(got) != want {
			t.Errorf("%s: %s %v, want %s", name, got, err, want)
		}
	}
	for _, tt := range []struct{ yaml, want string }{
		{"request_defaults: {model: x}\nmodels: {a: {}}\n", `c.yaml:3: request_defaults may not set "model"`},
		{"models:\n  a:\n    request_defaults: {model: x}\n", `c.yaml:5: request_defaults may not set "model"`},
		{"default_model: nope\nmodels: {a: {}}\n", `c.yaml:3: default_model "nope" is not a name`},
		{"default_model: sql\nmodels: {a: {adapters: {sql: /l/sql}}}\n", `c.yaml:3: default_model "sql" is an adapter`},
	} {
		if _, err := Parse("c.yaml", []byte(namesBase+tt.yaml)); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: %v, want %q", tt.yaml, err, tt.want)
		}
	}
}
