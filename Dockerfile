# RunPod serverless media worker.
#   docker build -t media-worker .
#   docker build --build-arg WHISPER_MODEL=large-v3 -t media-worker:large .
#   docker build --build-arg BAKE_MODELS=transcribe,speech,text2image,text2video -t media-worker:all .
#   docker build --build-arg TORCH_CUDA=cu129 --build-arg CUDA_BASE=12.9.1 -t media-worker:cu129 .

# TORCH_CUDA names the torch build, a wheel index of download.pytorch.org (cu126, cu129, cu130,
# cu132 for torch 2.13.0); it decides which hosts can run the image: a host's driver must support
# CUDA TORCH_CUDA or newer. cu126 is the oldest build of this torch, so it runs on the most RunPod
# hosts (drivers for CUDA 12.6 up to 13.0, .runpod/hub.json's allowedCudaVersions). CUDA_BASE is
# the matching nvidia/cuda image (same major.minor; the build checks it below).
ARG TORCH_CUDA=cu126
ARG CUDA_BASE=12.6.3
FROM nvidia/cuda:${CUDA_BASE}-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MODEL_DIR=/models

# Python, and ffmpeg from the distribution (openai-whisper and the media module call it).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates ffmpeg \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# torch first and on its own, from PyTorch's index for TORCH_CUDA (PyPI's default Linux wheel is a
# CUDA 13.0 build, which would need a CUDA 13 driver). Only torch comes from that index. The build
# stops if the torch build and the base image disagree on CUDA.
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
    && python -c "import os, torch; built, base = torch.version.cuda, os.environ['CUDA_VERSION']; \
assert built and base.startswith(built + '.'), f'torch is built for CUDA {built}, the base image has {base}'"

WORKDIR /app
COPY requirements.txt ./
RUN pip install -r requirements.txt

# Bake the weights of the tasks in BAKE_MODELS into the image, readable by any user.
ARG BAKE_MODELS=transcribe
ARG WHISPER_MODEL=turbo
ARG WHISPER_MODELS=""
ARG TTS_MODEL=facebook/mms-tts-eng
ARG IMAGE_MODEL=stabilityai/stable-diffusion-xl-base-1.0
ARG VIDEO_MODEL=Wan-AI/Wan2.1-T2V-1.3B-Diffusers
ENV BAKE_MODELS=${BAKE_MODELS} \
    VIDEO_MODEL=${VIDEO_MODEL} \
    WHISPER_MODEL=${WHISPER_MODEL} \
    WHISPER_MODELS=${WHISPER_MODELS} \
    TTS_MODEL=${TTS_MODEL} \
    IMAGE_MODEL=${IMAGE_MODEL}
# builder/ reads the worker's own settings and bakes where handler.pipelines.weights looks; only
# those modules come before the bake, so code changes elsewhere in handler/ do not invalidate the
# weights layer.
COPY handler/__init__.py handler/config.py ./handler/
COPY handler/pipelines/__init__.py handler/pipelines/weights.py ./handler/pipelines/
COPY builder ./builder
RUN python -m builder bake \
    && chmod -R a+rX "$MODEL_DIR"

COPY handler ./handler
COPY test_input.json ./

# Weights are in the image: never download at run time; load the default model at start.
ENV ALLOW_MODEL_DOWNLOAD=false \
    PRELOAD=transcribe

# WORKER_MODE picks the way in: queue (a RunPod queue endpoint) or http (a load-balancing endpoint
# or any container host: the HTTP server on PORT, health route HEALTH_CHECK_PATH on PORT_HEALTH).
ENV WORKER_MODE=queue \
    PORT=80
EXPOSE 80
CMD ["python", "-u", "-m", "handler"]
