# syntax=docker/dockerfile:1
# inference-gateway container image.
#
#   docker build -t inference-gateway .
#   docker run --rm -p 8080:8080 -e GATEWAY_ADMIN_TOKEN=... -e UPSTREAM_API_KEY=... \
#       -v "$PWD/my-config.yaml:/app/config/gateway.yaml:ro" \
#       inference-gateway serve --config /app/config/gateway.yaml --host 0.0.0.0
#
# Two stages: the builder installs the dependencies and the project's wheel into /opt/venv;
# the runtime stage is the same slim base with only that venv, config/ and a non-root user.
# Every dependency ships manylinux wheels, so no compiler is needed.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
RUN python -m venv /opt/venv

# Dependencies first, listed from pyproject.toml, so that editing gateway/ does not reinstall
# them. README.m[d] is a glob so the build works whether or not the README exists yet.
COPY pyproject.toml README.m[d] ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && /opt/venv/bin/pip install -r requirements.txt

# Then the project itself, as a wheel (not editable: the source tree stays in this stage).
COPY gateway/ gateway/
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-deps /wheels/*.whl \
    && /opt/venv/bin/inference-gateway --help > /dev/null

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="inference-gateway" \
      org.opencontainers.image.description="OpenAI-compatible reverse proxy that meters every call inline" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH="/opt/venv/bin:${PATH}"

# uid/gid 10001: outside the range of system and typical host users.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin gateway

WORKDIR /app

# The venv lives at the same path as in the builder (its scripts name /opt/venv/bin/python).
COPY --from=builder /opt/venv /opt/venv
# Config files stay root-owned: the gateway reads them and never writes them.
COPY config/ /app/config/

# store.data_dir (./var/store for the embedded store) resolves under /app/var: the only
# directory the gateway writes to. Chowned before VOLUME so a new volume inherits the owner.
RUN mkdir -p /app/var/store && chown -R gateway:gateway /app/var
VOLUME ["/app/var"]

USER gateway:gateway

EXPOSE 8080

# /readyz, not /healthz: /healthz answers 200 whenever the process answers at all, even when
# every call gets 503 because the store is gone; /readyz answers 200 only when the config is
# loaded and the store answers PING, i.e. when the gateway can meter and serve a call. So a
# container whose store is down (an external one, or an embedded one that keeps failing to
# restart) shows as unhealthy, and an orchestrator can take it out of rotation or replace it.
# A short outage (the embedded store is restarted within seconds) stays under --retries.
# Slim has no curl: Python's urllib exits non-zero on a refused connection, a timeout or a
# non-2xx status. (It probes port 8080; a container started with another --port needs its
# own healthcheck.)
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=3)"]

ENTRYPOINT ["inference-gateway"]
CMD ["serve", "--config", "/app/config/compose.yaml"]
