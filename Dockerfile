# vgw's image. Build: docker build -t vgw:local .   (make image)
#
# vgw reads GPU memory with NVML through cgo, and loads libnvidia-ml.so.1
# at run time (the NVIDIA Container Toolkit mounts it into a container
# given GPUs), so the runtime image needs glibc: distroless/base has it,
# and nothing else (no shell; `vgw health` is the health check).
ARG GO_IMAGE=golang:1.26.8-bookworm
# distroless publishes no versioned tags: pin by digest for a release
# (docker buildx imagetools inspect gcr.io/distroless/base-debian12 shows
# it), e.g. --build-arg RUNTIME_IMAGE=gcr.io/distroless/base-debian12@sha256:…
ARG RUNTIME_IMAGE=gcr.io/distroless/base-debian12:latest

FROM ${GO_IMAGE} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
# go-nvml's header marks old NVML calls deprecated; vgw calls none of them.
RUN CGO_ENABLED=1 CGO_CFLAGS="-O2 -g -Wno-deprecated-declarations" \
    go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/vgw ./cmd/vgw

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/vgw /vgw
# Root: vgw talks to the Docker socket, whose group differs per host.
USER 0
EXPOSE 9002 18000 9090 9091
ENTRYPOINT ["/vgw"]
CMD ["serve", "--config", "/etc/vgw/vgw.yaml"]
