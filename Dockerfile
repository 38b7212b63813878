# tessera: one frozen base model, many adapters, one image.
#
#   docker build -t tessera .                                   # CPU torch (default)
#   docker build -t tessera:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#   docker run -p 8000:8000 -e TESSERA_ADMIN_KEY=... tessera    # built-in model, embedded Redis
#
# Production (deploy/) points TESSERA_STORE_REDIS_URL at a shared Redis; the image's own
# redis-server (INSTALL_REDIS=true, the default) is only used when no URL is configured.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG INSTALL_REDIS=true

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TESSERA_HOST=0.0.0.0 \
    TESSERA_PORT=8000 \
    TESSERA_BUILTIN_DIR=/opt/tessera/builtin \
    TESSERA_STORE_DATA_DIR=/data/redis \
    HF_HOME=/data/hf

RUN if [ "$INSTALL_REDIS" = "true" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends redis-server \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# torch first and pinned, from the CPU index unless TORCH_INDEX says otherwise: this layer
# is the big one and changes least often.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/tessera/src
COPY pyproject.toml README.md ./
COPY adapters ./adapters
COPY store ./store
COPY engine ./engine
COPY server ./server
COPY train ./train
COPY tessera ./tessera
RUN pip install . \
    && python -c "from pathlib import Path; from tessera.engine import builtin; builtin.materialise(Path('${TESSERA_BUILTIN_DIR}'))"

RUN useradd --system --uid 10001 --create-home --home-dir /home/tessera tessera \
    && mkdir -p /data \
    && chown -R tessera:tessera /data /opt/tessera/builtin
USER tessera
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TESSERA_PORT', '8000') + '/healthz', timeout=2)"]

# exec form: tessera is PID 1 and receives SIGTERM itself (drain, then exit 0)
STOPSIGNAL SIGTERM
ENTRYPOINT ["tessera"]
CMD ["serve"]
