# syntax=docker/dockerfile:1
# GPU image of the rerank service: fp16 forward with the Triton kernels on CUDA.
#
#   docker build -t rerank-server:gpu .
#   docker run --rm --gpus all -p 8000:8000 -p 50051:50051 -v rerank-models:/models rerank-server:gpu \
#       --model BAAI/bge-reranker-v2-m3
#
# The torch wheel carries its own CUDA user-space libraries (cuBLAS, cuDNN, ... as nvidia-* wheels),
# so the base image only needs the NVIDIA container environment: the small `base` flavour, not
# `cudnn-runtime`, whose libraries would be a second copy. Keep CUDA_IMAGE's CUDA version the
# torch build's (PyPI's torch 2.13.0 for Linux is the CUDA 13.0 build: NVIDIA driver >= 580).
# For an older driver build e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
# Within pyproject's range (torch>=2.10,<2.15).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# cmake: the native build entry generates the gRPC stubs; gcc and libc6-dev compile the C kernels
# (librerank_cpu.so: --dtype int8's glue and attention, CPU only)
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv cmake gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first: the CUDA build (with its CUDA libraries and the Triton it was built against).
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
# The project's dependencies next, read from pyproject.toml (ranges) at the versions
# constraints.txt pins, in a layer of their own that stays cached while only the sources change
# (torch is already satisfied).
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt -c constraints.txt
COPY README.md CMakeLists.txt ./
COPY cmake ./cmake
COPY proto ./proto
COPY kernels ./kernels
COPY server ./server
COPY client ./client
# The service and its client (not editable): their builds (scikit-build-core -> CMake's `proto`
# target) generate the gRPC stubs into the wheels, as on every other machine.
# The `gpu` extra, Triton, came with the CUDA torch wheel, whose own pin lies within the extra's
# range; the import below proves it is there.
RUN pip install --no-deps . ./client \
 && python -P -c "import rerank_server.schema, rerank_server.openapi, rerank_server.__main__, rerank_client, triton; rerank_server.openapi.openapi_document()"

FROM ${CUDA_IMAGE} AS runtime
LABEL org.opencontainers.image.title="rerank-server (CUDA)" \
      org.opencontainers.image.description="gRPC + REST reranking service for BAAI/bge-reranker-v2-m3" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# Triton compiles a small C launcher the first time each kernel runs: it needs a C compiler and
# the Python headers at run time, not only at build time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it; /models is the model cache.
# /var/cache/rerank/triton is Triton's compiled-kernel cache (a volume, below).
RUN groupadd --system --gid 10001 rerank \
 && useradd --system --uid 10001 --gid rerank --home-dir /home/rerank --create-home --shell /usr/sbin/nologin rerank \
 && mkdir -p /models /var/cache/rerank/triton \
 && chown rerank:rerank /models /var/cache/rerank /var/cache/rerank/triton
COPY --from=build /opt/venv /opt/venv
# TRITON_CACHE_DIR on a volume: the kernels compiled at warm-up (~1 s each) survive restarts,
# so a restarted server warms up from the cache. TRITON_HOME (Triton's other scratch) and
# CUDA_CACHE_PATH under /tmp stay writable when the root filesystem is read-only (the
# Kubernetes manifests mount an emptyDir there).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models \
    TRITON_HOME=/tmp \
    TRITON_CACHE_DIR=/var/cache/rerank/triton \
    CUDA_CACHE_PATH=/tmp/.nv/ComputeCache
VOLUME ["/models", "/var/cache/rerank"]
WORKDIR /home/rerank
USER 10001:10001
EXPOSE 8000 50051
# 200 once the model is loaded and warmed (503 before). The start period covers a first download.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('RERANK_HTTP_PORT', '8000'), timeout=4)"]
# SIGTERM: stop accepting, finish accepted requests for --shutdown-grace seconds, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rerank-server"]
