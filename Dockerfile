# syntax=docker/dockerfile:1
#
# Lookback server image. Two targets:
#
#   docker build -t lookback:gpu .                 # default (last stage): CUDA 13 + cuDNN 9
#   docker build --target cpu -t lookback:cpu .    # python:3.11-slim + CPU onnxruntime
#
# Why this CUDA base: onnxruntime-gpu 1.31.1 on PyPI is the CUDA 13 build
# (onnxruntime/capi/build_and_package_info.py: cuda_version = '13.0').
# `readelf -d capi/libonnxruntime_providers_cuda.so` lists NEEDED libcublasLt.so.13,
# libcublas.so.13, libcudart.so.13, libcurand.so.10 and libcuda.so.1 (the driver); cuDNN is
# dlopen()ed as libcudnn.so.9 (cuDNN 9), cuFFT as libcufft.so.12 and NVRTC as libnvrtc.so.13.
# nvidia/cuda:13.0.x-cudnn-runtime-ubuntu24.04 ships all of them (cuDNN 9.13 in 13.0.1).
# The host needs an NVIDIA driver >= 580 (CUDA 13) and the NVIDIA Container Toolkit.
# ORT_VERSION is pinned on purpose: a later onnxruntime-gpu may move to another CUDA major,
# and then CUDA_IMAGE must move with it (the gpu stage's ldd check fails the build if not).
#
# Configuration is only LOOKBACK_* environment variables (service/lookback/settings.py); the image
# sets the few that differ in a container and bakes in the default model.

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim
ARG ORT_VERSION=1.31.1

# ---- wheel: the project as a pure-Python wheel (shared by both targets) ----------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- cpu-builder: venv with plain onnxruntime ------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-builder
ARG ORT_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
COPY --from=wheel /wheels /wheels
# pyproject picks onnxruntime-gpu on linux x86_64 through an environment marker, so install
# the project without dependencies, then its runtime requirements minus onnxruntime*, then
# the CPU onnxruntime (no 300 MB GPU wheel is downloaded just to be uninstalled). `pip check`
# must then pass except for the one requirement replaced on purpose (onnxruntime-gpu).
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --no-deps /wheels/*.whl \
    && python -c "import importlib.metadata as m; print('\n'.join(r for r in (m.requires('lookback-serve') or []) if not r.startswith('onnxruntime') and 'extra ==' not in r))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt "onnxruntime==${ORT_VERSION}" \
    && python -c "import subprocess, sys; out = subprocess.run([sys.executable, '-m', 'pip', 'check'], capture_output=True, text=True).stdout; bad = [x for x in out.splitlines() if x and 'requires onnxruntime-gpu' not in x and not x.startswith('No broken')]; sys.exit('\n'.join(bad) or None)" \
    && python -c "import onnxruntime as o; p = o.get_available_providers(); assert 'CUDAExecutionProvider' not in p, p"

# ---- cpu: runtime image ------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    LOOKBACK_MODEL_STORE=/app/model_store \
    LOOKBACK_HOST=0.0.0.0 \
    LOOKBACK_PORT=8000
RUN groupadd --system --gid 10001 lookback \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin lookback
COPY --from=cpu-builder /opt/venv /opt/venv
# The default model, owned by root and read-only to the server user.
COPY model_store/lookback-vad/ /app/model_store/lookback-vad/
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('LOOKBACK_PORT', '8000') + '/healthz', timeout=2)"]
ENTRYPOINT ["lookback", "serve"]

# ---- gpu-builder: venv with onnxruntime-gpu on the CUDA base's Python 3.12 -------------
FROM ${CUDA_IMAGE} AS gpu-builder
ARG ORT_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir /wheels/*.whl "onnxruntime-gpu==${ORT_VERSION}" \
    && pip check

# ---- gpu: runtime image (default target) -----------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    LOOKBACK_MODEL_STORE=/app/model_store \
    LOOKBACK_HOST=0.0.0.0 \
    LOOKBACK_PORT=8000
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 lookback \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin lookback
COPY --from=gpu-builder /opt/venv /opt/venv
# Fail the build, not the first request, when the base image does not match the wheel:
# every library the CUDA provider links must resolve (libcuda.so.1 comes from the host
# driver at run time), and the dlopen()ed cuDNN 9 / cuFFT / NVRTC must be installed.
RUN lib="$(echo /opt/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so)" \
    && missing="$(ldd "$lib" | grep 'not found' | grep -v 'libcuda\.so\.1' || true)" \
    && if [ -n "$missing" ]; then echo "CUDA provider libraries missing: $missing" >&2; exit 1; fi \
    && for so in libcudnn.so.9 libcufft.so.12 libnvrtc.so.13; do \
         ldconfig -p | grep -q "${so} " || { echo "missing ${so}" >&2; exit 1; }; \
       done
COPY model_store/lookback-vad/ /app/model_store/lookback-vad/
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('LOOKBACK_PORT', '8000') + '/healthz', timeout=2)"]
ENTRYPOINT ["lookback", "serve"]
