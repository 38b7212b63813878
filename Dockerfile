# syntax=docker/dockerfile:1
# tessera: one frozen base model, many adapters, one image (docs/deploy.md).
#
#   docker build -t tessera:0.1.0-cpu .                                  # CPU torch (default)
#   docker build -t tessera:0.1.0-cuda --build-arg VARIANT=cuda .        # CUDA 13 runtime wheels
#   docker build -t tessera:0.1.0-cpu-embedded --build-arg EMBEDDED_REDIS=true .
#   docker run --read-only --tmpfs /tmp -p 8000:8000 -e TESSERA_ADMIN_KEY=... \
#     -e TESSERA_STORE_REDIS_URL=redis://:PASSWORD@redis:6379/0 tessera:0.1.0-cpu
#
# Stages: `builder` makes /opt/venv (torch, then the other pinned dependencies, then
# tessera itself: three layers, the biggest and most stable first) and bakes the small
# built-in model; the final stage is the same pinned Python base with the venv copied in,
# no compiler, no pip cache, no redis-server unless EMBEDDED_REDIS=true (a production
# image talks to a shared Redis through TESSERA_STORE_REDIS_URL).
#
# Pins: the base image by digest (a multi-arch index; the same in both FROM lines),
# every Python package by constraints.txt, redis-server (embedded images only) by its
# Debian version. Bump them together and rerun tests/deploy (hadolint, tests/deploy/
# test_image.py) and the image smoke test in docs/deploy.md.

# cpu: torch from the PyTorch CPU index (no CUDA libraries, ~1 GB smaller);
# cuda: torch from PyPI with the CUDA 13.0 runtime as wheels (needs the NVIDIA driver
# >= 580 and the NVIDIA container toolkit / device plugin on the node).
ARG VARIANT=cpu
# true: the image carries redis-server and runs an embedded store when no
# TESSERA_STORE_REDIS_URL is set (single-container demos); false: production.
ARG EMBEDDED_REDIS=false

# --- build ---------------------------------------------------------------------------------
FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1 AS builder
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG PYPI_INDEX=https://pypi.org/simple
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
WORKDIR /src
COPY constraints.txt ./

# 1. torch: the big layer, changes least often.
RUN case "${VARIANT}" in \
      cpu)  index=(--index-url "${TORCH_CPU_INDEX}" --extra-index-url "${PYPI_INDEX}"); \
            torch="torch==${TORCH_VERSION}+cpu" ;; \
      cuda) index=(--index-url "${PYPI_INDEX}"); torch="torch==${TORCH_VERSION}" ;; \
      *)    echo "VARIANT must be cpu or cuda, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && pip install --constraint constraints.txt "${index[@]}" "${torch}"

# 2. the other runtime dependencies, read from pyproject.toml (no source code yet, so
#    editing code does not reinstall them).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install --constraint constraints.txt --index-url "${PYPI_INDEX}" \
        --requirement requirements.txt

# 3. tessera itself: the packages are the top-level folders, imported as tessera.<name>
#    through the links in tessera/. Built with the pinned setuptools already in the venv.
COPY README.md ./
COPY adapters ./adapters
COPY store ./store
COPY engine ./engine
COPY server ./server
COPY train ./train
COPY tessera ./tessera
RUN pip install --no-deps --no-build-isolation --constraint constraints.txt . \
    && pip check \
    && python -c "from pathlib import Path; from tessera.engine import builtin; builtin.materialise(Path('/opt/tessera/builtin'))"

# --- runtime -------------------------------------------------------------------------------
FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1 AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/data/home \
    HF_HOME=/data/hf \
    TESSERA_HOST=0.0.0.0 \
    TESSERA_PORT=8000 \
    TESSERA_BUILTIN_DIR=/opt/tessera/builtin \
    TESSERA_STORE_DATA_DIR=/data/redis \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# One numeric user and group (Kubernetes runAsNonRoot checks the number); /data is the
# writable state (embedded store, Hugging Face cache, $HOME), /models the base model
# (mounted read-only in production). The root filesystem can be read-only.
RUN groupadd --system --gid 10001 tessera \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /data/home \
        --shell /usr/sbin/nologin tessera \
    && mkdir -p /data/home /data/hf /data/redis /models \
    && chown -R 10001:10001 /data /models

FROM runtime AS final
ARG EMBEDDED_REDIS
ARG REDIS_DEB_VERSION=5:7.0.15-1~deb12u10
RUN if [ "${EMBEDDED_REDIS}" = "true" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends "redis-server=${REDIS_DEB_VERSION}" \
        && rm -rf /var/lib/apt/lists/*; \
    elif [ "${EMBEDDED_REDIS}" != "false" ]; then \
        echo "EMBEDDED_REDIS must be true or false, not '${EMBEDDED_REDIS}'" >&2; exit 1; \
    fi
ARG VARIANT
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="tessera" \
      org.opencontainers.image.description="Multi-tenant adapter serving: one frozen base model, many adapters in one batch" \
      org.opencontainers.image.version="${VERSION}-${VARIANT}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=10001:10001 /opt/tessera/builtin /opt/tessera/builtin
WORKDIR /data/home
USER 10001:10001
VOLUME ["/data", "/models"]
EXPOSE 8000

# Docker and Compose only (Kubernetes ignores it and uses the probes in deploy/):
# liveness, the same route as the livenessProbe.
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TESSERA_PORT', '8000') + '/healthz', timeout=2)"]

# Exec form: tessera is PID 1 and gets SIGTERM itself: /readyz turns 503, running requests
# get TESSERA_DRAIN_TIMEOUT_S, the rest end with finish reason "shutdown", then exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tessera"]
CMD ["serve"]
