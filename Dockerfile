# The sidecar as a container image (see docs/operations.md, "Run with Docker").
#
#   docker build -t sidecar .
#   docker run --init -p 127.0.0.1:8088:8088 -p 127.0.0.1:8089:8089 \
#       -v "$PWD/config:/etc/sidecar:ro" sidecar
#
# BASE_IMAGE: any Debian-like image whose python3 (>= 3.11) has the venv
# module. Where no registry is reachable, build one locally and pass it with
# --build-arg BASE_IMAGE=... (scripts/docker-smoke does exactly that).
ARG BASE_IMAGE=python:3.12-slim

# ---------------------------------------------------------------- build stage
FROM ${BASE_IMAGE} AS build
# Behind a TLS-intercepting proxy, put the full CA bundle as
# deploy/docker/build-trust/ca-certificates.crt (and, for a private index, a
# pip.conf) before building. They are used by pip in this stage only, never
# reach the final image, and are git-ignored.
COPY deploy/docker/build-trust/ /tmp/build-trust/
COPY requirements/runtime.lock /src/requirements/
COPY pyproject.toml README.md /src/
COPY sidecar/ /src/sidecar/
RUN set -eu; \
    if [ -f /tmp/build-trust/ca-certificates.crt ]; then export PIP_CERT=/tmp/build-trust/ca-certificates.crt; fi; \
    if [ -f /tmp/build-trust/pip.conf ]; then export PIP_CONFIG_FILE=/tmp/build-trust/pip.conf; fi; \
    python3 -m venv /opt/sidecar; \
    # Exactly the locked, hash-checked versions; then the sidecar itself on top,
    # with nothing left for pip to resolve.
    /opt/sidecar/bin/pip install --no-cache-dir --disable-pip-version-check --quiet \
        --require-hashes -r /src/requirements/runtime.lock; \
    /opt/sidecar/bin/pip install --no-cache-dir --disable-pip-version-check --quiet --no-deps /src; \
    /opt/sidecar/bin/pip check; \
    /opt/sidecar/bin/sidecar --help >/dev/null

# -------------------------------------------------------------- runtime stage
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/sidecar/bin:$PATH \
    SIDECAR_CONFIG=/etc/sidecar/upstreams.yaml
RUN useradd --system --user-group --uid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sidecar
COPY --from=build /opt/sidecar /opt/sidecar
# The shipped config; docker-compose.yml bind-mounts ./config over it so that
# edits on the host reload the running sidecar.
COPY config/upstreams.yaml /etc/sidecar/upstreams.yaml
USER 10001:10001
WORKDIR /tmp
# Inside the container both listeners bind every interface; publish them on
# the host's loopback only (see docker-compose.yml).
EXPOSE 8088 8089
# SIGTERM starts the graceful drain (docs/operations.md); give `docker stop` a grace
# period above shutdown_timeout (compose: stop_grace_period).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8089/healthz', timeout=2)"]
# Exec form: the sidecar itself receives the signals (run with --init, or
# compose's `init: true`, so that a tiny init reaps and forwards).
ENTRYPOINT ["sidecar"]
CMD ["run", "--listen", "0.0.0.0:8088", "--admin", "0.0.0.0:8089"]
