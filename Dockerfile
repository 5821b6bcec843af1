# syntax=docker/dockerfile:1
# inference-gateway container image. It starts with nothing else: the default command is the
# demo (the mock upstream and the gateway on config/compose.yaml, the embedded store in the
# /app/var volume); for a real upstream, serve a config of your own.
#
#   docker build -t inference-gateway .
#   docker run --rm -p 127.0.0.1:8080:8080 -e GATEWAY_ADMIN_TOKEN=... -v gateway-data:/app/var \
#       inference-gateway                                        # the demo, as compose.yaml runs it
#   docker run --rm -p 127.0.0.1:8080:8080 -e GATEWAY_ADMIN_TOKEN=... -e OPENAI_API_KEY=... \
#       -v gateway-data:/app/var -v "$PWD/gateway.yaml:/app/config/gateway.yaml:ro" \
#       inference-gateway serve --config /app/config/gateway.yaml   # your own config
#
# Two stages: the builder installs the pinned dependencies (deploy/requirements.lock) and the
# project's wheel into /opt/venv; the runtime stage is the same base with only that venv,
# config/, tini and a non-root user. Every dependency ships manylinux wheels: no compiler.

# Pinned by digest: a tag can be re-pushed, a digest cannot. This is the digest public
# Dockerfiles record for python:3.11.11-slim-bookworm; it could not be looked up from the
# machine this file was written on (no registry access). Check it, and take a newer one when
# upgrading, with:  docker buildx imagetools inspect python:3.11.11-slim-bookworm
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5

# ---------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
RUN python -m venv /opt/venv

# Dependencies first (so that editing gateway/ does not reinstall them), exactly as locked:
# --no-deps installs nothing the lock does not name, and `pip check` fails the build if the
# lock is incomplete. scripts/lock_requirements.py writes the lock.
COPY deploy/requirements.lock ./
RUN /opt/venv/bin/pip install --no-deps -r requirements.lock \
    && /opt/venv/bin/pip check

# Then the project itself, as a wheel built with the locked setuptools (not editable: the
# source tree stays in this stage).
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
RUN /opt/venv/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-deps /wheels/*.whl \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/inference-gateway --help > /dev/null

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="inference-gateway" \
      org.opencontainers.image.description="OpenAI-compatible reverse proxy that meters every call inline" \
      org.opencontainers.image.licenses="Apache-2.0"

# tini is PID 1: it forwards signals to the gateway (PID 1 gets no default signal actions, so
# without an init a SIGTERM would be ignored by anything that did not install a handler) and
# reaps orphaned processes. Pinned to bookworm's package; `--build-arg TINI_VERSION=` takes
# whatever the archive has.
ARG TINI_VERSION=0.19.0-1+b3
RUN apt-get update \
    && apt-get install -y --no-install-recommends "tini${TINI_VERSION:+=$TINI_VERSION}" \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH="/opt/venv/bin:${PATH}"

# uid/gid 10001: outside the range of system and typical host users. A host directory mounted
# as /app/var must be writable by it (chown 10001:10001).
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin gateway

WORKDIR /app

# The venv lives at the same path as in the builder (its scripts name /opt/venv/bin/python).
COPY --from=builder /opt/venv /opt/venv
# Config files stay root-owned: the gateway reads them and never writes them.
COPY config/ /app/config/

# The embedded store's data directory (config/compose.yaml: store.data_dir /app/var/store):
# the only place the gateway writes: the append-only files, store.password, the settlement
# journal. Chowned before VOLUME so a new named volume inherits the owner.
RUN mkdir -p /app/var/store && chown -R gateway:gateway /app/var
VOLUME ["/app/var"]

USER gateway:gateway

EXPOSE 8080

# /readyz, not /healthz: /healthz answers 200 whenever the process answers at all, even when
# every call gets 503 because the store is gone; /readyz answers 200 only when the config is
# loaded and the store answers PING, i.e. when the gateway can meter and serve a call. A
# short outage (the embedded store is restarted within seconds) stays under --retries.
# Slim has no curl: Python's urllib exits non-zero on a refused connection, a timeout or a
# non-2xx status. (It probes port 8080; a container started with another --port needs its
# own healthcheck.)
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=3)"]

ENTRYPOINT ["/usr/bin/tini", "--", "inference-gateway"]
CMD ["demo", "--config", "/app/config/compose.yaml"]
