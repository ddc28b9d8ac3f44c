# syntax=docker/dockerfile:1
#
# journeyman: one image, two roles chosen by the command (`orchestrator`, `agents`).
# Build:  docker build -t journeyman .

# ---- build ------------------------------------------------------------------
FROM rust:1-bookworm AS builder
# cmake: fallback build path of aws-lc-sys (TLS for amqps://) on targets without a
# prebuilt configuration; the cc-based default does not need it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The whole context (see .dockerignore): the binary embeds schemas/ at compile time.
COPY . .
# Cache mounts keep the registry and target/ between builds; the binary is copied out
# in the same step because the target/ cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin journeyman \
    && install -D -m 0755 target/release/journeyman /out/journeyman

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# Non-root. /data and /etc/journeyman/keys are created and owned here so that a fresh
# named volume mounted on them inherits the ownership: the orchestrator keeps its sled
# store in /data, and docker compose's `keys` service writes the signing key file into
# /etc/journeyman/keys.
RUN groupadd --system --gid 10001 journeyman \
    && useradd --system --uid 10001 --gid journeyman --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin journeyman \
    && mkdir -p /data /etc/journeyman/keys \
    && chown journeyman:journeyman /data /etc/journeyman/keys \
    && chmod 0700 /etc/journeyman/keys
COPY --from=builder /out/journeyman /usr/local/bin/journeyman
USER 10001:10001
WORKDIR /data
ENV JOURNEYMAN_DATA_DIR=/data/store \
    RUST_LOG="info,lapin=warn"
# The orchestrator's sled store: one process per directory, keep it on a volume.
VOLUME ["/data"]
# The orchestrator's HTTP server (health, readiness, metrics, API, dashboard) when
# JOURNEYMAN_HTTP_ADDR=0.0.0.0:8080, as compose and Kubernetes set it.
EXPOSE 8080
# Liveness of the orchestrator: GET /healthz on JOURNEYMAN_HTTP_ADDR (no curl in the
# image: the binary probes itself). The agents serve no HTTP; compose disables this for
# them, and Kubernetes ignores it in favour of the pod's probes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["journeyman", "health"]
# SIGTERM (docker stop, Kubernetes) starts a graceful stop; this is the default, made
# explicit because the graceful stop depends on it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["journeyman"]
CMD ["--help"]
