# syntax=docker/dockerfile:1
#
# openai-stream-proxy container image.
#
#   docker build -t openai-stream-proxy .
#   docker run --rm -p 8080:8080 -p 9090:9090 openai-stream-proxy
#   docker run --rm -p 8080:8080 -v "$PWD/my-config.json:/config/config.json:ro" openai-stream-proxy
#
# The image reads /config/config.json. A default one (deploy/docker/config.json: 0.0.0.0:8080 →
# https://api.openai.com, admin endpoints on 0.0.0.0:9090) is baked in; mount your own file (or,
# on Kubernetes, a ConfigMap) over /config to replace it. Checked by scripts/lint-packaging.sh.

# ---- build stage --------------------------------------------------------------------------------
FROM rust:1-slim-bookworm AS builder
WORKDIR /src
# The whole context (.dockerignore leaves out target/, .git and local venvs): every target that
# Cargo.toml declares (benches, examples, tests) must exist for the manifest to load.
COPY . .
# The release profile in Cargo.toml (LTO, one codegen unit, stripped) applies. The cache mounts
# keep the registry and target/ between builds (BuildKit); the binary is copied out of the mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin openai-stream-proxy \
    && install -D -m 0755 target/release/openai-stream-proxy /out/openai-stream-proxy

# ---- runtime stage ------------------------------------------------------------------------------
# Debian slim rather than distroless: the Kubernetes preStop hook needs /bin/sleep. The image only
# adds the CA bundle (HTTPS upstreams use the system trust store; SSL_CERT_FILE/SSL_CERT_DIR work).
FROM debian:bookworm-slim

# Package versions are not pinned so that a rebuild picks up Debian's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 proxy \
    && useradd --system --uid 10001 --gid proxy --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin proxy

COPY --from=builder /out/openai-stream-proxy /usr/local/bin/openai-stream-proxy
COPY LICENSE /usr/share/doc/openai-stream-proxy/LICENSE
COPY deploy/docker/config.json /config/config.json

# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# Documentation only: the ports the proxy listens on come from the config file (each rule's
# listenPort; adminListen for /healthz and /metrics). These match deploy/docker/config.json.
EXPOSE 8080 9090

# SIGTERM (like SIGINT) stops accepting and drains in-flight requests for up to 30 s; give
# `docker stop` more than that: `docker stop -t 35`.
STOPSIGNAL SIGTERM

# `docker run IMAGE --version` or `docker run IMAGE -c /elsewhere.json` replace the CMD only.
ENTRYPOINT ["/usr/local/bin/openai-stream-proxy"]
CMD ["-c", "/config/config.json"]
