# syntax=docker/dockerfile:1
# fanout: fanout-edge and fanout-publish in a small non-root image.
#
#   docker build -t fanout:dev .
#   docker run --rm -p 8080:8080 fanout:dev                  # dev mode
#   docker run --rm fanout:dev --help
#   docker run --rm --entrypoint fanout-publish fanout:dev --help
#
# Needs BuildKit (the default of Docker 23+): the cargo registry and the target
# directory live in cache mounts, so a rebuild after a source change only
# compiles the workspace crates, not the dependencies.
#
# No HEALTHCHECK: the image has no HTTP client (curl would double its size).
# Orchestrators probe GET /healthz (liveness) and GET /readyz (readiness)
# themselves; see deploy/k8s/base/deployment.yaml.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# The binaries are copied out of the cache mount within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p fanout-edge -p fanout-publisher \
 && install -D -m 0755 -t /out target/release/fanout-edge target/release/fanout-publish

FROM debian:${DEBIAN_RELEASE}-slim
# CA certificates from the build stage (for TLS to Redis), without apt in this
# image; a fixed uid that Kubernetes' runAsNonRoot can verify.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN groupadd --system --gid 10001 fanout \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin fanout
COPY --from=build /out/fanout-edge /out/fanout-publish /usr/local/bin/
USER 10001:10001
EXPOSE 8080
ENV FANOUT_LISTEN=0.0.0.0:8080 \
    FANOUT_LOG_FORMAT=json
# SIGTERM starts the paced drain (--drain-secs, default 25 s): give the
# container that long to stop (docker stop -t 30, compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/fanout-edge"]
