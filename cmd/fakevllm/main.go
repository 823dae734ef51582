// Command fakevllm is a stand-in for a vLLM OpenAI server, for running and
// testing vgw without a GPU: /health, /v1/models, /v1/completions,
// /v1/chat/completions (streamed or not) and /metrics, with a token rate
// and switches for failures. vgw fakevllm runs the same thing.
package main

import (
	"os"

	"github.com/vgw-project/vgw/internal/fakevllm"
)

func main() { os.Exit(fakevllm.Main(os.Args[1:], os.Stdout, os.Stderr)) }
