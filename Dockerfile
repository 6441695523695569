# kvproxy: the OpenAI-compatible prefix-caching server.
#
# CPU build (default):
#   docker build -t kvproxy .
# CUDA build: the same image with PyTorch's CUDA wheels (they bundle the CUDA runtime; the host
# needs only the NVIDIA driver and the NVIDIA Container Toolkit, then `docker run --gpus all`):
#   docker build -t kvproxy:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
#   docker run --gpus all -p 8000:8000 -e KVPROXY_DEVICE=cuda kvproxy:cuda
#
# Every `kvproxy serve` option is an environment variable KVPROXY_<NAME> (see docker-compose.yml).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE}

# The PyTorch wheel index: CPU wheels unless told otherwise (see above).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf \
    KVPROXY_CACHE_DIR=/data/cache \
    KVPROXY_DISK_DIR=/data/blocks \
    KVPROXY_HOST=0.0.0.0 \
    KVPROXY_PORT=8000

WORKDIR /app

# torch first, from the chosen index, so the layer is reused when only the code changes.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch

COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY cache_store ./cache_store
COPY model_runner ./model_runner
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /data kvproxy \
    && mkdir -p /data \
    && chown kvproxy /data

USER kvproxy
# The disk tier, the demo model, the fingerprint cache and downloaded models live here.
VOLUME ["/data"]
EXPOSE 8000

# /health is 503 while the model loads and 200 once it serves (also when a tier is degraded).
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"KVPROXY_PORT\", \"8000\")}/health', timeout=2)"

ENTRYPOINT ["kvproxy"]
CMD ["serve"]
