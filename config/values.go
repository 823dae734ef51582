package config

import (
	"fmt"
	"strconv"
	"time"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
)

// The value types below decode from the YAML node itself, so that a bad
// value is reported at its line like any other decoding error.

// nodeError is a decoding error positioned at n.
func nodeError(n ast.Node, format string, args ...any) error {
	return &yaml.SyntaxError{Message: fmt.Sprintf(format, args...), Token: n.GetToken()}
}

// scalar returns the text of a scalar node.
func scalar(n ast.Node) (string, bool) {
	switch n := n.(type) {
	case *ast.StringNode:
		return n.Value, true
	case *ast.IntegerNode, *ast.FloatNode:
		return n.GetToken().Value, true
	}
	return "", false
}

// Duration is a time.Duration written as Go writes one: "30s", "10m",
// "1h30m", "200ms".
type Duration time.Duration

// Std returns d as a time.Duration.
func (d Duration) Std() time.Duration { return time.Duration(d) }

func (d Duration) String() string { return time.Duration(d).String() }

// UnmarshalYAML implements yaml.NodeUnmarshaler.
func (d *Duration) UnmarshalYAML(n ast.Node) error {
	s, ok := scalar(n)
	if !ok {
		return nodeError(n, "want a duration such as 30s, got %s", n.Type())
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return nodeError(n, "invalid duration %q: want a number with a unit such as 30s, 10m or 1h", s)
	}
	*d = Duration(v)
	return nil
}

// UnmarshalYAML implements yaml.NodeUnmarshaler: a whole number of bytes
// or a string with a unit.
func (b *Bytes) UnmarshalYAML(n ast.Node) error {
	s, ok := scalar(n)
	if !ok {
		return nodeError(n, "want a memory size such as 80GiB, got %s", n.Type())
	}
	if i, err := strconv.ParseInt(s, 10, 64); err == nil && i >= 0 {
		*b = Bytes(i)
		return nil
	}
	v, err := ParseBytes(s)
	if err != nil {
		return nodeError(n, "%v", err)
	}
	*b = v
	return nil
}

// UnmarshalYAML implements yaml.NodeUnmarshaler: "auto" or a list of GPUs.
func (g *GPUs) UnmarshalYAML(n ast.Node) error {
	if s, ok := scalar(n); ok {
		if s != "auto" {
			return nodeError(n, `gpus must be "auto" or a list of GPUs, got %q`, s)
		}
		g.Auto = true
		return nil
	}
	if _, ok := n.(*ast.SequenceNode); !ok {
		return nodeError(n, `gpus must be "auto" or a list of GPUs`)
	}
	return yaml.NodeToValue(n, &g.Declared, yaml.DisallowUnknownField())
}
