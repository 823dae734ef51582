#!/usr/bin/env bash
# make e2e-envoy: the end-to-end scenarios with real HTTP through a real
# Envoy: a cold start, a warm request, a streamed one, a queue overflowing
# into 429, and a swap when memory runs out.
#
# It needs an Envoy: `envoy` or `func-e` on PATH (vgw then runs here, on
# the sim runtime with examples/sim.yaml, and Envoy with
# envoy/envoy-local.yaml). Where there is none it says so and exits 0: it
# never reports a pass it did not see.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v envoy >/dev/null 2>&1; then
	envoy_cmd=(envoy)
elif command -v func-e >/dev/null 2>&1; then
	envoy_cmd=(func-e run)
else
	echo "e2e-envoy: SKIPPED: no Envoy here (neither envoy nor func-e is on PATH); nothing was tested"
	exit 0
fi
command -v curl >/dev/null 2>&1 || { echo "e2e-envoy: FAIL: curl is needed to send the requests"; exit 1; }
if [ "${envoy_cmd[0]}" = func-e ]; then
	echo "e2e-envoy: func-e downloads Envoy on its first run; offline, it fails here rather than skipping"
fi

work=$(mktemp -d)
pids=()
cleanup() {
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

fail() {
	echo "e2e-envoy: FAIL: $*"
	echo "--- vgw's log"; tail -n 40 "$work/vgw.log" || true
	echo "--- Envoy's log"; tail -n 40 "$work/envoy.log" || true
	exit 1
}

go build -o "$work/vgw" ./cmd/vgw
"$work/vgw" serve --config examples/sim.yaml >"$work/vgw.log" 2>&1 &
pids+=($!)
"${envoy_cmd[@]}" -c envoy/envoy-local.yaml --log-level warn >"$work/envoy.log" 2>&1 &
pids+=($!)

url=http://127.0.0.1:8080/v1/chat/completions
# ask MODEL [STREAM] [MAX_TOKENS]: prints the HTTP status; the body goes to $work/body.
ask() {
	curl -sS -o "$work/body" -w '%{http_code}' --max-time 120 "$url" \
		-H 'content-type: application/json' \
		-d "{\"model\":\"$1\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":${2:-false},\"max_tokens\":${3:-4}}"
}

# Envoy is up once its listener answers, and vgw once its always-on model is.
for _ in $(seq 1 100); do
	curl -s -o /dev/null http://127.0.0.1:8080/v1/models && break
	sleep 0.2
done
[ "$(ask llama-3.1-8b)" = 200 ] || fail "llama-3.1-8b (always on) is not answered through Envoy: $(cat "$work/body")"

# docker-compose.yaml's health check of Envoy, word for word, against this
# Envoy's admin (127.0.0.1:9901 in envoy-local.yaml too): it must see LIVE.
check=$(grep -o "exec 3<>/dev/tcp/127.0.0.1/9901 && printf '[^']*' >&3 && grep -q LIVE <&3" docker-compose.yaml | head -n 1 | sed 's/\\\\/\\/g')
[ -n "$check" ] || fail "no Envoy health check found in docker-compose.yaml"
timeout 5 bash -c "$check" || fail "docker-compose.yaml's Envoy health check does not pass against a real Envoy: $check"

start=$(date +%s%N)
[ "$(ask mistral-7b)" = 200 ] || fail "cold request for mistral-7b: $(cat "$work/body")"
cold=$(( ($(date +%s%N) - start) / 1000000 ))
start=$(date +%s%N)
[ "$(ask mistral-7b)" = 200 ] || fail "warm request for mistral-7b: $(cat "$work/body")"
warm=$(( ($(date +%s%N) - start) / 1000000 ))
echo "cold start ${cold} ms, warm request ${warm} ms"
[ "$warm" -lt "$cold" ] || fail "the warm request ($warm ms) was not faster than the cold one ($cold ms)"

[ "$(ask mistral-7b true)" = 200 ] || fail "streamed request: $(cat "$work/body")"
grep -q 'data: \[DONE\]' "$work/body" || fail "the stream did not end with data: [DONE]: $(cat "$work/body")"

# qwen2.5-32b takes 4 at once and queues 16: 30 slow requests at once
# overflow it.
[ "$(ask qwen2.5-32b)" = 200 ] || fail "qwen2.5-32b: $(cat "$work/body")"
requests=()
for i in $(seq 1 30); do
	curl -sS -o /dev/null -w '%{http_code}\n' --max-time 120 "$url" -H 'content-type: application/json' \
		-d '{"model":"qwen2.5-32b","messages":[{"role":"user","content":"hi"}],"max_tokens":50}' >"$work/code.$i" &
	requests+=($!)
done
for pid in "${requests[@]}"; do wait "$pid" || true; done
n429=$(cat "$work"/code.* | grep -c '^429$' || true)
n200=$(cat "$work"/code.* | grep -c '^200$' || true)
echo "30 at once for qwen2.5-32b: $n200 answered, $n429 refused with 429"
if [ "$n429" -eq 0 ] || [ "$n200" -eq 0 ]; then fail "expected both 200s and 429s"; fi

# What real OpenAI clients send (issue 15): every name of a model, the
# model list and cards, vgw's health, and nothing else reaching a backend.
[ "$(ask meta-llama/Llama-3.1-8B-Instruct)" = 200 ] || fail "the HF repo id: $(cat "$work/body")"
[ "$(ask gpt-4o-mini)" = 200 ] || fail "an alias: $(cat "$work/body")"
code() { curl -sS -o "$work/body" -w '%{http_code}' --max-time 30 "$@"; }
[ "$(code http://127.0.0.1:8080/v1/models/meta-llama/Llama-3.1-8B-Instruct)" = 200 ] || fail "GET /v1/models/{id}: $(cat "$work/body")"
grep -q '"vgw_state"' "$work/body" || fail "no vgw_state in the model card: $(cat "$work/body")"
[ "$(code http://127.0.0.1:8080/health)" = 200 ] || fail "GET /health: $(cat "$work/body")"
[ "$(code -X OPTIONS http://127.0.0.1:8080/v1/chat/completions)" = 204 ] || fail "OPTIONS: $(cat "$work/body")"
for path in /sleep /wake_up /collective_rpc /metrics /version; do
	[ "$(code -X POST "http://127.0.0.1:8080$path" -H 'x-vgw-model: llama-3.1-8b' -H 'content-type: application/json' -d '{"model":"llama-3.1-8b"}')" = 404 ] || fail "$path reached something: $(cat "$work/body")"
	grep -q '"code":"not_found"' "$work/body" || fail "$path: not the OpenAI error shape: $(cat "$work/body")"
done
[ "$(code "$url" -H 'x-vgw-cluster: vgw_qwen2.5-32b' -H 'content-type: application/json' -d '{"model":"nope"}')" = 404 ] || fail "a client's x-vgw-cluster routed: $(cat "$work/body")"
head -c 9437184 /dev/zero | tr '\0' ' ' >"$work/big"
[ "$(code "$url" -H 'content-type: application/json' -H 'transfer-encoding: chunked' --data-binary @"$work/big")" = 413 ] || fail "a chunked body over the limit: $(cat "$work/body")"
grep -q '"error"' "$work/body" || fail "Envoy's 413 is not in the OpenAI error shape: $(cat "$work/body")"
head -c 2000000 /dev/urandom >"$work/speech.mp3"
[ "$(code http://127.0.0.1:8080/v1/audio/transcriptions -F file=@"$work/speech.mp3" -F model=gpt-4o-mini)" = 200 ] || fail "a Whisper upload: $(cat "$work/body")"
# Over HTTP/2 a stream's buffer starts at its 8 MiB window; the audio
# route raises it to 25 MiB (conn_manager_impl.cc refreshBufferLimit).
head -c 20000000 /dev/urandom >"$work/long.mp3"
[ "$(code --http2-prior-knowledge http://127.0.0.1:8080/v1/audio/transcriptions -F file=@"$work/long.mp3" -F model=llama-3.1-8b)" = 200 ] || fail "a 20 MB upload over HTTP/2: $(cat "$work/body")"

# gemma-2-27b needs memory the resident models hold: one is swapped out.
[ "$(ask gemma-2-27b)" = 200 ] || fail "gemma-2-27b (a swap): $(cat "$work/body")"
grep -q '"msg":"model evicted"\|msg="model evicted"' "$work/vgw.log" || fail "no model was evicted for gemma-2-27b"

echo "e2e-envoy: PASS (through $("${envoy_cmd[@]}" --version 2>/dev/null | head -n 1 || echo Envoy))"
