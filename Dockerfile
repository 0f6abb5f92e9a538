# RunPod serverless media worker.
#   docker build -t media-worker .
#   docker build --build-arg WHISPER_MODEL=large-v3 -t media-worker:large .
#   docker build --build-arg BAKE_MODELS=transcribe,speech,text2image,text2video -t media-worker:all .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

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

# torch first and on its own: PyPI's default Linux wheel is the CUDA build this image wants.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"

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
# builder/ reads the worker's own settings; only that module comes before the bake, so code
# changes elsewhere in handler/ do not invalidate the weights layer.
COPY handler/__init__.py handler/config.py ./handler/
COPY builder ./builder
RUN python -m builder bake \
    && chmod -R a+rX "$MODEL_DIR"

COPY handler ./handler
COPY test_input.json ./

# Weights are in the image: never download at run time; load the default model at start.
ENV ALLOW_MODEL_DOWNLOAD=false \
    PRELOAD=transcribe

CMD ["python", "-u", "-m", "handler"]
