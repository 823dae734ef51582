# vgw developer commands. `make help` lists them.
GO        ?= go
BIN       ?= bin
CONFIG    ?= examples/sim.yaml
# docker compose v2, or the standalone docker-compose.
COMPOSE   ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
# Tools the checks need, pinned; `make tools` installs them.
STATICCHECK_VERSION ?= v0.8.2
BUF_VERSION         ?= v1.75.0
PROTOC_GEN_GO_VERSION      ?= v1.36.12
PROTOC_GEN_GO_GRPC_VERSION ?= v1.6.2
GOBIN     ?= $(shell $(GO) env GOPATH)/bin
FUZZTIME  ?= 20s
# go-nvml's header marks old NVML calls deprecated; vgw calls none of them.
export CGO_CFLAGS ?= -O2 -g -Wno-deprecated-declarations

.PHONY: help build image up network admin-token down logs sim-up sim-down compose-check envoy-api e2e e2e-envoy test lint fmt proto proto-check bench bench-go bench-models bench-xds bench-docker bench-load bench-rss soak fuzz fuzz-ci run tools clean

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

build: ## build bin/vgw and bin/vgwload
	$(GO) build -o $(BIN)/vgw ./cmd/vgw
	$(GO) build -o $(BIN)/vgwload ./cmd/vgwload

image: ## build the vgw:local and vgw-fakevllm:local images (needs the Go base image)
	docker build -t vgw:local .
	docker build -t vgw-fakevllm:local -f Dockerfile.fakevllm .

# The models' bridge network (runtime.network in the config): Envoy and vgw
# run in the host's network namespace, the model containers alone on this
# network, so none of them can reach vgw's ports (docker-compose.yaml).
NETWORK     ?= vgw
SIM_NETWORK ?= vgw-sim
# The admin service's token, readable by its owner only; compose mounts it.
ADMIN_TOKEN ?= secrets/admin-token

up: network admin-token ## start Envoy and vgw on this GPU server (docker-compose.yaml)
	$(COMPOSE) up -d --build

network: ## create the models' network (NETWORK) if it is missing
	docker network inspect $(NETWORK) >/dev/null 2>&1 || docker network create $(NETWORK)

admin-token: ## create the admin token (ADMIN_TOKEN) if it is missing, readable by its owner only
	@test -s $(ADMIN_TOKEN) || { mkdir -p $(dir $(ADMIN_TOKEN)) && (umask 077 && head -c 32 /dev/urandom | base64 > $(ADMIN_TOKEN)) && echo "created $(ADMIN_TOKEN)"; }

# vgw leaves its model containers running when it stops, for the next vgw
# to adopt (docker compose restart vgw keeps models loaded); down removes
# them too, once vgw has stopped, so that nothing holds the GPUs, then the
# network. INSTANCE is runtime.instance in deploy/vgw.yaml.
INSTANCE  ?= vgw
down: ## stop Envoy, vgw and the model containers vgw started
	$(COMPOSE) stop vgw
	docker rm -f $$(docker ps -aq --filter label=vgw.managed=true --filter label=vgw.instance=$(INSTANCE)) 2>/dev/null || true
	$(COMPOSE) down
	docker network rm $(NETWORK) 2>/dev/null || true

logs: ## follow vgw's and Envoy's logs
	$(COMPOSE) logs -f --tail=100

# The sim stack is its own compose project, so that on a GPU server it
# never replaces the real stack's containers or touches its volumes.
SIM       = $(COMPOSE) -p vgw-sim -f docker-compose.sim.yaml

sim-up: image admin-token ## the same stack with no GPU: fake vLLM containers (docker-compose.sim.yaml)
	$(MAKE) network NETWORK=$(SIM_NETWORK)
	$(SIM) up -d --no-build

sim-down: ## stop the sim stack, its model containers, their cache volume and network
	$(SIM) stop vgw
	docker rm -f $$(docker ps -aq --filter label=vgw.managed=true --filter label=vgw.instance=vgw-sim) 2>/dev/null || true
	$(SIM) down -v
	docker volume rm vgw-sim-hf-cache 2>/dev/null || true
	docker network rm $(SIM_NETWORK) 2>/dev/null || true

compose-check: ## the compose files are valid for the compose tool here
	$(COMPOSE) -f docker-compose.yaml config -q
	$(SIM) config -q

e2e: ## the deployment end to end on the real Docker engine (also part of make test)
	$(GO) test -count=1 -v ./e2e/

e2e-envoy: ## the end-to-end scenarios through a real Envoy, where one exists (else says it skipped)
	bash deploy/e2e-envoy.sh

test: ## run every test under the race detector (the fuzz corpora run as tests), then check every shipped config
	$(GO) test -race -count=1 ./...
	$(GO) build -o $(BIN)/vgw ./cmd/vgw
	for c in examples/*.yaml deploy/*.yaml; do $(BIN)/vgw validate --config $$c && $(BIN)/vgw envoy-check --config $$c envoy/*.yaml || exit 1; done
	$(MAKE) envoy-api

# envoy/pinned is a module of its own, built with the go-control-plane/envoy
# release of the Envoy that compose pins (the main module's is newer); it
# fails if the compose files pin another Envoy minor version.
envoy-api: ## the shipped bootstraps and vgw's xDS resources against the API of the Envoy compose pins
	cd envoy/pinned && $(GO) test -count=1 ./...
	cd envoy/pinned && $(GO) build -o $(abspath $(BIN))/envoy-api .
	$(BIN)/envoy-api -compose docker-compose.yaml,docker-compose.sim.yaml envoy/*.yaml xds/testdata/*.golden.json

lint: ## go vet, staticcheck, gofmt and shellcheck (envoy/pinned too)
	$(GO) vet ./...
	$(GOBIN)/staticcheck ./...
	cd envoy/pinned && $(GO) vet ./... && $(GOBIN)/staticcheck ./...
	@test -z "$$(gofmt -l .)" || { echo "gofmt would change:"; gofmt -l .; exit 1; }
	@if command -v shellcheck >/dev/null; then shellcheck deploy/*.sh; else echo "shellcheck not installed: deploy/*.sh not checked"; fi

fmt: ## format the code
	gofmt -w .

proto: ## regenerate proto/adminv1 from proto/admin.proto with the pinned tools
	PATH="$(GOBIN):$$PATH" $(GOBIN)/buf generate

proto-check: proto ## fail if the committed generated code is stale
	@test -z "$$(git status --porcelain -- proto/)" || { echo "proto/ is stale: run make proto and commit"; git status --porcelain -- proto/; git diff --stat -- proto/; exit 1; }

bench: bench-go bench-models bench-xds bench-docker bench-load bench-rss ## every benchmark (see BENCHMARKS.md)

bench-go: ## Go benchmarks of the request path
	$(GO) test -run '^$$' -bench . -benchmem ./extproc/

bench-models: ## cold start and swap overheads (sim runtime), the manager's memory per waiter
	$(GO) test -run '^$$' -bench 'ColdStart|Swap' -benchtime 60x ./cmd/vgw/
	$(GO) test -run '^$$' -bench WaitingMemory -benchtime 1x ./manager/runtime/sim/

bench-xds: ## change-to-ACK latency, snapshot build and push for 200 models
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 300x ./xds/

bench-docker: ## the Docker runtime on the real engine: cold start, crash noticed
	$(GO) test -run '^$$' -bench DockerColdStart -benchtime 40x ./cmd/vgw/
	$(GO) test -run '^$$' -bench DockerCrashNoticed -benchtime 40x ./manager/runtime/docker/

bench-load: build ## drive vgw and a no-op floor over loopback gRPC as Envoy would
	$(BIN)/vgwload --vgw $(BIN)/vgw

bench-rss: build ## vgw's memory with 200 models and 10,000 requests waiting
	$(BIN)/vgwload rss --vgw $(BIN)/vgw

soak: ## the load tests at full scale: 10,000 queued, 50 models x 200 in flight (RELIABILITY.md)
	$(GO) test -count=1 -timeout 20m -run 'TestLoad' -v ./cmd/vgw/ -args -soak

fuzz: ## fuzz the parsers and the Envoy-config checker for FUZZTIME each
	$(GO) test -run '^$$' -fuzz FuzzExtractModel -fuzztime $(FUZZTIME) ./extproc/
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime $(FUZZTIME) ./config/
	$(GO) test -run '^$$' -fuzz FuzzCheck -fuzztime $(FUZZTIME) ./envoy/

fuzz-ci: ## the fuzz targets for 10s each, as CI runs them
	$(MAKE) fuzz FUZZTIME=10s

run: ## serve the sim config: no GPU, no Docker
	$(GO) run ./cmd/vgw serve --config $(CONFIG)

# grpcurl, which the admin tests drive vgw with, is pinned in go.mod as a
# tool: `go tool grpcurl`.
tools: ## install the pinned tools lint and proto use
	$(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	$(GO) install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
	$(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	$(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

clean:
	rm -rf $(BIN)
