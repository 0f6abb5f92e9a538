"""Every setting the worker reads, parsed once from the environment at start-up.

Each variable is listed once below with what it does. Values are parsed explicitly: a
boolean must be one of true/false/1/0/yes/no/on/off, a number must parse, and a bad value
stops the worker at start-up with a message naming the variable, rather than turning
``"false"`` into true or failing in the middle of a job.

Standard library only, and nothing else of the worker's: builder/ reads the settings in the image
before the rest of handler/ is there, and every layer of the worker may import them.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
MIB = 1024 * 1024
# No `blank` given: a blank variable keeps the default.
_UNSET: Any = object()


@dataclass(frozen=True)
class Variable:
    """An environment variable as docs/configuration.md lists it (handler/config_docs.py writes the list)."""

    env: str
    # What it is for: the list's meaning, in Markdown.
    about: str
    # What the list says for its default where the declared value does not say it (blank: the value).
    default_words: str = ""
    # The declared default (None for the bucket's variables: unset, there is no bucket).
    default: Any = None


# The variables of the operator's bucket: one setting (`bucket`), read together by _bucket.
BUCKET = (
    Variable("BUCKET_ENDPOINT_URL", "S3 endpoint of the output bucket (unset: AWS)"),
    Variable("BUCKET_ACCESS_KEY_ID", "access key of the output bucket; unset, as `BUCKET_SECRET_ACCESS_KEY` and "
             "`BUCKET_NAME` are: no bucket, and outputs come back inline"),
    Variable("BUCKET_SECRET_ACCESS_KEY", "secret key of the output bucket (needed with `BUCKET_ACCESS_KEY_ID`)"),
    Variable("BUCKET_NAME", "the bucket; unset: the one in a virtual-hosted `BUCKET_ENDPOINT_URL` "
             "(`https://<bucket>.s3.<region>.amazonaws.com`), else the one runpod's `rp_upload` uses (named after "
             "the month, `MM-YY`)", "as `rp_upload`"),
    Variable("BUCKET_REGION", "region for signing (read from `.s3.<region>.` endpoints as `rp_upload` does)",
             "from the endpoint, else `us-east-1`"),
)
BUCKET_VARIABLES = tuple(variable.env for variable in BUCKET)


@dataclass(frozen=True)
class BucketSettings:
    """Credentials and location of an S3-compatible bucket."""

    endpoint_url: str | None
    access_key_id: str
    secret_access_key: str = field(repr=False)
    # None: the bucket runpod's rp_upload would use, named after the month ("11-26").
    name: str | None
    region: str | None = None

    def bucket_name(self) -> str:
        return self.name or time.strftime("%m-%y")


# A virtual-hosted bucket endpoint: the bucket is the host's first labels.
_VIRTUAL_HOSTED = (
    re.compile(r"(?P<bucket>.+)\.(?P<service>s3[.-](?:(?P<region>[a-z0-9-]+)\.)?amazonaws\.com)"),
    re.compile(r"(?P<bucket>.+)\.(?P<service>(?P<region>[a-z0-9-]+)\.digitaloceanspaces\.com)"),
)


def split_bucket_endpoint(url: str) -> tuple[str, str | None, str | None]:
    """``https://<bucket>.s3.<region>.amazonaws.com`` -> (``https://s3.<region>.amazonaws.com``,
    bucket, region): the bucket goes in the request, not twice in the key. Other URLs pass as
    they are, with the region runpod's rp_upload reads from them (``.s3.<region>.``). The one
    endpoint parser: of the worker's bucket (BUCKET_ENDPOINT_URL) and of a job's ``s3Config``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    for pattern in _VIRTUAL_HOSTED:
        found = pattern.fullmatch(host)
        if found:
            netloc = found["service"] + (f":{parts.port}" if parts.port else "")
            return urlunsplit((parts.scheme, netloc, "", "", "")), found["bucket"], found["region"]
    aws = re.fullmatch(r"s3[.-](?P<region>[a-z0-9-]+)\.amazonaws\.com", host)
    region = aws["region"] if aws else url.split(".s3.")[1].split(".")[0] if ".s3." in url else None
    return url, None, region


class SettingsError(ValueError):
    """An environment variable has a value the worker cannot use; raised at start-up."""


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected true or false")


def _parse_positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _parse_int_up_to(most: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _parse_positive_int(raw)
        if value > most:
            raise ValueError(f"must be at most {most}")
        return value

    return parse


def _parse_positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def _parse_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _parse_pairs(raw: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in _parse_list(raw):
        name, sep, target = (part.strip() for part in item.partition("="))
        if not sep or not name or not target:
            raise ValueError(f"expected name=model pairs, got {item!r}")
        pairs.append((name, target))
    return tuple(pairs)


def _parse_prefix(raw: str) -> str:
    prefix = raw.strip().strip("/")
    if not prefix:
        raise ValueError("must not be empty: uploads need a prefix of their own")
    return prefix


def _parse_networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in _parse_list(raw))


def _parse_slots(raw: str) -> int | None:
    return None if raw.strip().lower() == "auto" else _parse_positive_int(raw)


def _parse_fraction(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 1:
        raise ValueError("must be above 0 and at most 1")
    return value


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _parse_port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError("must be a port number, 1-65535")
    return value


def _parse_path(raw: str) -> str:
    path = raw.strip()
    if not path.startswith("/") or any(c.isspace() or c in "?#" for c in path):
        raise ValueError("must be a path starting with /, without spaces, ? or #")
    return path


# faster-whisper's names for the number formats Whisper runs in (handler.pipelines.whisper.compute_types).
WHISPER_COMPUTE_TYPES = ("auto", "float32", "int8", "float16", "bfloat16")
VIDEO_CACHES = ("none", "first_block", "faster")
VIDEO_GROUP_OFFLOADS = ("none", "block", "leaf")
# diffusers' attention backends that run from this image's packages (the *_hub ones download
# kernels at run time, which an offline worker cannot), each with the module it needs.
ATTENTION_BACKENDS = {
    "native": "torch", "flex": "torch", "_native_cudnn": "torch", "_native_efficient": "torch",
    "_native_flash": "torch", "_native_math": "torch", "flash": "flash_attn", "_flash_3": "flash_attn_interface",
    "sage": "sageattention",
}


def _parse_attention_backend(raw: str) -> str:
    value = _parse_choice(*ATTENTION_BACKENDS)(raw)
    if importlib.util.find_spec(ATTENTION_BACKENDS[value]) is None:
        raise ValueError(f"needs the Python package {ATTENTION_BACKENDS[value]}, which is not installed")
    return value


def _parse_level(raw: str) -> str:
    return _parse_choice("debug", "info", "warning", "error")(raw).upper()


def _present(raw: str) -> bool:
    """A variable whose being set (to anything but blanks) is the setting."""
    return True


def _text(raw: str) -> str:
    return raw.strip()


def setting(env: str, parse: Callable[[str], Any], default: Any = None, *, about: str, blank: Any = _UNSET,
            default_factory: Callable[[], Any] | None = None, repr: bool = True, shapes: tuple[str, ...] = (),
            default_words: str = "") -> Any:
    """A field of :class:`Settings` read from the variable ``env`` by ``parse``: the one
    declaration of a setting. ``about`` says what it is for (docs/configuration.md's meaning).
    Unset or blank, it keeps ``default`` (``default_words``: how the docs say it, where the value
    alone does not); ``blank``, when given, is what a variable set to blanks means instead.
    ``shapes``: the tasks whose results it shapes (so whose result cache keys hold its value)."""
    metadata = {"env": env, "parse": parse, "blank": blank, "shapes": frozenset(shapes), "about": about,
                "default_words": default_words}
    if default_factory is not None:
        return field(default_factory=default_factory, repr=repr, metadata=metadata)
    return field(default=default, repr=repr, metadata=metadata)


def flag(env: str, default: bool, *, about: str, default_words: str = "") -> Any:
    """A boolean setting: set but blank, it is off (as runpod's SDK reads its own flags); it shapes no result."""
    return setting(env, _parse_bool, default, about=about, blank=False, default_words=default_words)


@dataclass(frozen=True)
class Settings:
    """The worker's configuration. Build it with :func:`load_settings`.

    A setting shapes the results of the tasks its ``shapes`` names: its value is in their result
    cache keys. Every other setting decides where and how the worker runs, where results go, or
    which jobs it refuses, never what an accepted job's result is (tests/test_cache_keys.py checks
    both ways, on every setting and every task with a cache). Each says what it is for in ``about``,
    which docs/configuration.md's table shows (``make docs`` writes it).
    """

    on_runpod: bool = setting(
        "RUNPOD_ENDPOINT_ID", _present, False, default_words="(set by RunPod)",
        about="when set, the worker is on RunPod: logs are JSON (`LOG_FORMAT=auto`), and the HTTP server "
              "leaves out its browser guard (`HTTP_ALLOWED_HOSTS`)")
    worker_id: str | None = setting(
        "RUNPOD_POD_ID", _text, None, default_words="(set by RunPod)",
        about="the worker id `system` reports (the host name when unset)")
    post_progress: bool = setting(
        "RUNPOD_WEBHOOK_POST_OUTPUT", _present, False, default_words="(set by RunPod)",
        about="when set (by RunPod's job loop), long jobs post progress updates")
    log_level: str = setting(
        "LOG_LEVEL", _parse_level, "INFO",
        about="level of the worker's own log lines: `debug`, `info`, `warning`, `error`")
    log_format: str = setting(
        "LOG_FORMAT", _parse_choice("auto", "json", "console"), "auto",
        about="`auto` (JSON on RunPod, console elsewhere), `json` or `console`")

    whisper_model: str = setting(
        "WHISPER_MODEL", str.strip, "turbo", shapes=("transcribe", "text2video"),
        about="default Whisper model (text2video's captions too): an official name (`turbo`, `tiny.en`, ...) "
              "or a checkpoint path")
    # It shapes no result: the model a job runs is in that job's key.
    whisper_models: tuple[str, ...] = setting(
        "WHISPER_MODELS", _parse_list, (),
        about="other models a job may ask for in `model`, comma separated")
    whisper_model_map: tuple[tuple[str, str], ...] = setting(
        "WHISPER_MODEL_MAP", _parse_pairs, (), shapes=("transcribe",),
        about="names a job may send that another served model answers, e.g. `base=turbo,large-v3=turbo` "
              "(clients of other workers always send their own name; the result's `model` names the one that "
              "ran)")
    whisper_batch_size: int = setting(
        "WHISPER_BATCH_SIZE", _parse_positive_int, 8, shapes=("transcribe",),
        about="chunks of a recording (and of the jobs a worker holds) decoded together by default; 1 keeps "
              "openai-whisper's sequential transcribe (without VAD). text2video's captions are timed by "
              "`whisper.transcribe` itself, never in batches")
    whisper_compute_type: str = setting(
        "WHISPER_COMPUTE_TYPE", _parse_choice(*WHISPER_COMPUTE_TYPES), "auto", shapes=("transcribe", "text2video"),
        about="number format Whisper runs in (a job's `compute_type` overrides it): `auto` (`int8` for batched "
              "decoding on the CPU, `float32` for openai-whisper's sequential path and captions there; `float16` "
              "on CUDA; PRECISION `full` or `half` decide instead when set), `float32`, `int8` (CPU: the decoder's "
              "projection onto the vocabulary in dynamic int8, its deciding logits in float32; from medium's "
              "width on its blocks' linear layers too), `float16`, `bfloat16`")
    whisper_batch_window_ms: float = setting(
        "WHISPER_BATCH_WINDOW_MS", lambda raw: max(0.0, float(raw)), 10.0,
        about="how long a batch waits for chunks of the worker's other jobs before it runs (a batch gives "
              "each job the result it gets alone)")
    model_dir: Path = setting(
        "MODEL_DIR", Path, Path("/models"),
        about="where baked weights live (`whisper/<name>.pt`, written by `builder/`); their identity, not "
              "their place, is in a result's cache key")
    allow_model_download: bool = flag(
        "ALLOW_MODEL_DOWNLOAD", True, default_words="`true` (image: `false`)",
        about="fetch weights missing from `MODEL_DIR` at load time; off, the worker makes no network call "
              "for models at all (the model libraries are put in offline mode)")
    runpod_hf_cache: Path = setting(
        "RUNPOD_HF_CACHE", Path, Path("/runpod-volume/huggingface-cache/hub"),
        about="RunPod's cached Hugging Face models (an endpoint's model cache); a repo id found there is "
              "used without a download")
    tts_model: str = setting(
        "TTS_MODEL", str.strip, "facebook/mms-tts-eng", shapes=("speech", "text2video"),
        about="speech model (VITS / MMS-TTS class, text2video's narration too): a Hugging Face repo id "
              "(baked) or a local directory")
    diarization_model: str = setting(
        "DIARIZATION_MODEL", str.strip, "resemblyzer-0.1.4.pt", shapes=("transcribe",),
        about="the GE2E voice encoder of speaker diarization: a checkpoint file name under "
              "`MODEL_DIR/diarize/`, or a path. The default is Resemblyzer 0.1.4's `pretrained.pt` (from its "
              "PyPI wheel), baked under that name (`python -m builder import-voice-encoder WHEEL` puts it "
              "there)")
    image_model: str = setting(
        "IMAGE_MODEL", str.strip, "stabilityai/stable-diffusion-xl-base-1.0", shapes=("text2image",),
        about="text-to-image diffusers pipeline (SD, SDXL, FLUX class): repo id (baked) or directory")
    video_model: str = setting(
        "VIDEO_MODEL", str.strip, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", shapes=("text2video",),
        about="text-to-video diffusers pipeline (Wan2.1 T2V, LTX-Video): repo id (baked) or directory")
    enable_cpu_offload: bool = flag(
        "ENABLE_CPU_OFFLOAD", False,
        about="keep diffusers models in RAM, moving each to the GPU when used (fits small GPUs, runs "
              "slower; the same weights, the same results)")
    precision: str = setting(
        "PRECISION", _parse_choice("auto", "half", "full"), "auto", shapes=("transcribe", "text2image", "text2video"),
        about="number format the models run in: `auto` (half on CUDA: fp16 Whisper, bf16 diffusion with the "
              "video VAE in fp32; fp32 on the CPU), `half` (those CUDA choices on any device; the suite runs "
              "them so on a CPU), `full` (fp32 everywhere). Speech is fp32 always")
    video_cache: str = setting(
        "VIDEO_CACHE", _parse_choice(*VIDEO_CACHES), "none", shapes=("text2video",),
        about="reuse transformer work across denoising steps (diffusers' transformer cache): `none`, "
              "`first_block` (First Block Cache: skip the later blocks while the first block's output barely "
              "changes) or `faster` (FasterCache: reuse attention outputs every other step); faster, slightly "
              "different videos. MagCache is not offered (diffusers 0.42 needs per-checkpoint calibrated "
              "ratios and a fixed step count)")
    video_cache_threshold: float = setting(
        "VIDEO_CACHE_THRESHOLD", _parse_positive_float, 0.05, shapes=("text2video",),
        about="`first_block`: relative change of the first block's output below which a step reuses the "
              "cache (higher: more steps skipped, less faithful)")
    video_compile: bool = flag(
        "VIDEO_COMPILE", False,
        about="`torch.compile` the video transformer's repeated block once per process (regional "
              "compilation: tens of seconds at the first job, then faster steps; the same operations as fused "
              "kernels, so the same video to within rounding)")
    video_attention_backend: str | None = setting(
        "VIDEO_ATTENTION_BACKEND", _parse_attention_backend, None, shapes=("text2video",),
        default_words="(torch default)",
        about="diffusers attention backend of the video transformer (unset: torch's "
              f"`scaled_dot_product_attention`): {', '.join(f'`{name}`' for name in ATTENTION_BACKENDS)}; "
              "`flash`, `_flash_3` and `sage` need their packages, and are refused at start-up without them")
    video_group_offload: str = setting(
        "VIDEO_GROUP_OFFLOAD", _parse_choice(*VIDEO_GROUP_OFFLOADS), "none",
        about="keep the video models in RAM and stream groups of layers to a small GPU as they run: `none`, "
              "`block` (a block at a time, on a side stream) or `leaf` (layer by layer); the same weights, "
              "the same videos; not with `ENABLE_CPU_OFFLOAD`")
    video_text_encoder_offload: str = setting(
        "VIDEO_TEXT_ENCODER_OFFLOAD", _parse_choice("auto", "true", "false"), "auto",
        about="keep a video model's text encoder (UMT5-XXL for Wan: three quarters of its weights, used once "
              "per prompt) in host RAM, its layers visiting the GPU while they encode the prompt: `true`, "
              "`false`, or `auto` (when the pipeline's weights are over half the GPU memory budget)")
    device: str = setting(
        "DEVICE", _parse_choice("auto", "cuda", "cpu"), "auto",
        about="`auto` (cuda when available), `cuda` or `cpu`. A worker given a GPU (`RUNPOD_GPU_COUNT`, "
              "`NVIDIA_VISIBLE_DEVICES`) that it cannot use refuses to start (exit 3) unless `DEVICE=cpu` asks "
              "for the CPU on purpose (the device it resolves to is in a result's cache key)")
    runpod_gpu_count: int = setting(
        "RUNPOD_GPU_COUNT", lambda raw: max(0, int(raw)), 0, default_words="(set by RunPod)",
        about="GPUs given to the worker; above 0 promises a GPU")
    nvidia_visible_devices: str | None = setting(
        "NVIDIA_VISIBLE_DEVICES", _text, None, default_words="(set by the container runtime)",
        about="devices given to the container; one named (not `all`, `void`, `none` or empty) promises a GPU, "
              "as a `/dev/nvidiaN` node does (the nvidia/cuda base image itself sets `all`)")
    preload: tuple[str, ...] = setting(
        "PRELOAD", _parse_list, (), default_words="(image: `transcribe`)",
        about="tasks whose default model loads and warms up at start, off the job path, before the first job "
              "is taken (comma list)")
    bake_models: tuple[str, ...] = setting(
        "BAKE_MODELS", _parse_list, ("transcribe",),
        about="image builds only: tasks whose models `builder/` bakes in (comma list)")

    task_modules: tuple[str, ...] = setting(
        "TASK_MODULES", _parse_list, (),
        about="extra task modules to serve: importable names, comma separated, each defining `TASK`")

    max_concurrent_jobs: int = setting(
        "MAX_CONCURRENT_JOBS", _parse_positive_int, 1,
        about="jobs one worker holds at once (RunPod's `concurrency_modifier`); more than the GPU slots lets "
              "downloads, decoding and uploads overlap GPU work")
    max_concurrent_generations: int | None = setting(
        "MAX_CONCURRENT_GENERATIONS", _parse_slots, 1,
        about="GPU slots, jobs running model code at once; `auto` sizes them at start from free memory and "
              "the default model's measured footprint")
    generation_slots_cap: int = setting(
        "GENERATION_SLOTS_CAP", _parse_positive_int, 4,
        about="most slots `auto` may choose")
    memory_reserve_mb: int = setting(
        "MEMORY_RESERVE_MB", lambda raw: max(0, int(raw)), 2048,
        about="GPU memory kept out of the budget (the CUDA context, other processes) and out of the slots "
              "`auto` sizes; host RAM a parked pipeline must leave free")
    gpu_memory_budget_mb: int | None = setting(
        "GPU_MEMORY_BUDGET_MB", _parse_positive_int, None,
        about="memory the pipelines' weights and working memory may take on the device; unset: the GPU's "
              "memory less `MEMORY_RESERVE_MB` (no bound on the CPU). Idle pipelines leave the device, least "
              "recently used first, to make room ([operations.md](operations.md#gpu-memory))")
    model_instances: int = setting(
        "MODEL_INSTANCES", _parse_positive_int, 1,
        about="copies of each pipeline; a job borrows one for its whole run")
    memory_pressure_threshold: float = setting(
        "MEMORY_PRESSURE_THRESHOLD", _parse_fraction, 0.85,
        about="RAM or VRAM use (0-1) above which new jobs get `OVERLOADED`")
    max_jobs_per_worker: int | None = setting(
        "MAX_JOBS_PER_WORKER", _parse_positive_int, None,
        about="after this many jobs the result asks RunPod to restart the worker")
    shutdown_grace_s: float = setting(
        "SHUTDOWN_GRACE_S", _parse_positive_float, 10.0,
        about="after SIGTERM, how long running jobs may finish before they are cancelled (and answered "
              "`CANCELLED`); keep it under the platform's kill timeout")
    generation_acquire_timeout: float = setting(
        "GENERATION_ACQUIRE_TIMEOUT", _parse_positive_float, 600.0,
        about="seconds a job waits for a slot before `TIMEOUT`")
    model_load_wait_timeout: float = setting(
        "MODEL_LOAD_WAIT_TIMEOUT", _parse_positive_float, 1800.0,
        about="seconds a job waits for another job's load of the same model")

    # The output bucket, read from BUCKET's variables by _bucket. It shapes no result: the result cache
    # lives in it, so its entries are per bucket.
    bucket: BucketSettings | None = field(default=None, metadata={"shapes": frozenset(), "variables": BUCKET})
    bucket_prefix: str = setting(
        "BUCKET_PREFIX", lambda raw: raw.strip().strip("/"), "outputs",
        about="key prefix for every object the worker writes")
    presign_expiry_s: int = setting(
        "PRESIGN_EXPIRY_S", _parse_int_up_to(7 * 24 * 3600), 3600,
        about="lifetime of the presigned GET URLs in results (at most 604800, the 7 days SigV4 allows)")
    result_cache: bool = flag(
        "RESULT_CACHE", True,
        about="answer a request seen before (same task, model weights, output-affecting fields and media "
              "bytes) from the bucket, on any worker; needs a bucket")
    result_cache_prefix: str = setting(
        "RESULT_CACHE_PREFIX", _parse_prefix, "cache",
        about="key prefix of the result cache's entries")
    result_cache_secret: str | None = setting(
        "RESULT_CACHE_SECRET", _text, None, repr=False, default_words="derived from `BUCKET_SECRET_ACCESS_KEY`",
        about="key of the HMAC that authenticates cache entries; give every worker of an endpoint the same "
              "one. Unset: derived from `BUCKET_SECRET_ACCESS_KEY`, which every worker of the endpoint has and "
              "no job sees; with no bucket either, a random key per process")
    result_cache_timeout_s: float = setting(
        "RESULT_CACHE_TIMEOUT_S", _parse_positive_float, 5.0,
        about="deadline of a whole cache lookup (or store); a slower lookup is a miss")
    upload_prefix: str = setting(
        "UPLOAD_PREFIX", _parse_prefix, "uploads",
        about="key prefix of the presigned uploads the `upload` task hands out (give it a bucket lifecycle "
              "rule); only objects under it may be deleted after reading")
    upload_expiry_s: int = setting(
        "UPLOAD_EXPIRY_S", _parse_positive_int, 900,
        about="lifetime of a presigned upload (POST) URL")
    upload_timeout_s: float = setting(
        "UPLOAD_TIMEOUT_S", _parse_positive_float, 600.0,
        about="deadline of one output file's upload to a job's own `s3Config` bucket")
    upload_max_attempts: int = setting(
        "UPLOAD_MAX_ATTEMPTS", _parse_positive_int, 3,
        about="attempts per S3 request (botocore's standard retry mode)")
    s3_connect_timeout_s: float = setting(
        "S3_CONNECT_TIMEOUT_S", _parse_positive_float, 5.0,
        about="socket timeout of an S3 request's connect")
    s3_read_timeout_s: float = setting(
        "S3_READ_TIMEOUT_S", _parse_positive_float, 60.0,
        about="socket timeout of each read of an S3 response")
    inline_output_max_bytes: int = setting(
        "INLINE_OUTPUT_MAX_BYTES", _parse_positive_int, 10 * MIB,
        about="with no bucket, the most file bytes one result may inline (RunPod refuses results over "
              "~20 MB after base64)")

    download_max_bytes: int = setting(
        "DOWNLOAD_MAX_BYTES", _parse_positive_int, 1024 * MIB,
        about="largest media download (URL or bucket object)")
    download_timeout_s: float = setting(
        "DOWNLOAD_TIMEOUT_S", _parse_positive_float, 300.0,
        about="deadline of a whole download, connect to last byte, redirects included (and of each read or "
              "delete in a job's own `s3Config` bucket)")
    download_max_redirects: int = setting(
        "DOWNLOAD_MAX_REDIRECTS", lambda raw: max(0, int(raw)), 5,
        about="redirects followed, each one checked like the first URL")
    download_allow_http: bool = flag(
        "DOWNLOAD_ALLOW_HTTP", False,
        about="accept plain `http` URLs (downloads and per-job `s3Config` endpoints); `https` only by "
              "default")
    download_allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = setting(
        "DOWNLOAD_ALLOWED_NETWORKS", _parse_networks, (),
        about="non-public networks downloads and per-job `s3Config` endpoints may reach (CIDR list). Empty by "
              "default: loopback, private, link-local and other non-global addresses are refused")
    base64_max_bytes: int = setting(
        "BASE64_MAX_BYTES", _parse_positive_int, 100 * MIB,
        about="largest decoded base64 input, checked before decoding")
    max_speech_chars: int = setting(
        "MAX_SPEECH_CHARS", _parse_positive_int, 5000,
        about="longest text `speech` (and text2video's `narration`) accepts")
    max_image_pixels: int = setting(
        "MAX_IMAGE_PIXELS", _parse_positive_int, 2048 * 2048,
        about="largest width x height of a generated image or video frame")
    video_clip_frames: int | None = setting(
        "VIDEO_CLIP_FRAMES", _parse_positive_int, None, shapes=("text2video",), default_words="the family's",
        about="most frames one generated clip has (unset: what the model family makes well, 81 for Wan, 121 "
              "for LTX); longer videos are joined from several clips")
    max_video_duration_s: float = setting(
        "MAX_VIDEO_DURATION_S", _parse_positive_float, 60.0,
        about="longest video `text2video` makes, narration included")
    max_video_frames: int = setting(
        "MAX_VIDEO_FRAMES", _parse_positive_int, 1921,
        about="most frames one `text2video` job may make")
    max_images: int = setting(
        "MAX_IMAGES", _parse_positive_int, 4,
        about="most images one `text2image` job may ask for")
    max_steps: int = setting(
        "MAX_STEPS", _parse_positive_int, 100,
        about="most inference steps a generation job may ask for")
    max_audio_duration_s: float = setting(
        "MAX_AUDIO_DURATION_S", _parse_positive_float, 4 * 3600.0,
        about="longest audio a transcription accepts (checked before decoding)")
    media_timeout_s: float = setting(
        "MEDIA_TIMEOUT_S", _parse_positive_float, 600.0,
        about="deadline of each ffmpeg/ffprobe run")

    worker_mode: str = setting(
        "WORKER_MODE", _parse_choice("queue", "http"), "queue",
        about="`queue`: RunPod's job queue (`python -m handler`); `http`: the HTTP server (as `python -m "
              "handler serve`), for RunPod load-balancing endpoints and any container host")
    http_host: str = setting(
        "HTTP_HOST", str.strip, "0.0.0.0",  # noqa: S104 (a container's port is published on purpose)
        about="address the HTTP server binds (all interfaces in a container)")
    port: int = setting(
        "PORT", _parse_port, 80,
        about="port of the HTTP server (RunPod load-balancing endpoints set it: the endpoint's exposed port)")
    port_health: int | None = setting(
        "PORT_HEALTH", _parse_port, None, default_words="`PORT`",
        about="port of the health route, when it differs from `PORT` (that port serves only the health route)")
    health_check_path: str = setting(
        "HEALTH_CHECK_PATH", _parse_path, "/ping",
        about="the health route RunPod's load balancer polls: 204 loading, 200 ready, 503 draining or after a "
              "sticky CUDA error")
    max_concurrent_requests: int = setting(
        "MAX_CONCURRENT_REQUESTS", _parse_positive_int, 32,
        about="HTTP requests held at once (uploads and jobs); more get 429 with `Retry-After`")
    retry_after_s: int = setting(
        "RETRY_AFTER_S", _parse_positive_int, 5,
        about="the `Retry-After` an overloaded, draining or full HTTP server answers a 429 or 503 with")
    api_key: str | None = setting(
        "API_KEY", _text, None, repr=False,
        about="when set, every HTTP route but the health route needs `Authorization: Bearer <key>` (the "
              "scheme in any case)")
    http_allowed_hosts: tuple[str, ...] = setting(
        "HTTP_ALLOWED_HOSTS", lambda raw: tuple(name.lower() for name in _parse_list(raw)), (),
        about="with no `API_KEY` and off RunPod: host names a request's `Host` may carry besides IP addresses "
              "and `localhost`, so that a web page cannot reach the worker by DNS rebinding (a request with "
              "an `Origin` or a route's wrong `Content-Type` is refused too; [http.md](http.md#keys))")
    http_max_connections: int = setting(
        "HTTP_MAX_CONNECTIONS", _parse_positive_int, 512,
        about="connections (and requests in progress) the HTTP server holds at once; past it, a request is "
              "answered 503 by the server itself")
    http_max_head_bytes: int = setting(
        "HTTP_MAX_HEAD_BYTES", _parse_positive_int, 64 * 1024,
        about="largest request head (request line and headers); past it, 400 and the connection closed")
    http_max_headers: int = setting(
        "HTTP_MAX_HEADERS", _parse_positive_int, 100,
        about="most header fields one request may carry; more get 431")
    http_head_timeout_s: float = setting(
        "HTTP_HEAD_TIMEOUT_S", _parse_positive_float, 10.0,
        about="a request head must be complete this long after its connection opened (or after its first "
              "byte, on a kept-alive connection); otherwise the connection is closed")
    http_keep_alive_s: int = setting(
        "HTTP_KEEP_ALIVE_S", _parse_positive_int, 5,
        about="how long an idle kept-alive connection stays open")

    use_ram_filesystem: bool = flag(
        "USE_RAM_FILESYSTEM", False,
        about="put job directories under `/dev/shm`")
    work_dir: Path = setting(
        "WORK_DIR", Path, default_factory=lambda: Path(tempfile.gettempdir()), default_words="system temp",
        about="where job directories go (unset: the system's temp directory)")

    def job_root(self) -> Path:
        """Directory that holds one temporary directory per job."""
        shm = Path("/dev/shm")  # noqa: S108 (a private mkdtemp per job goes inside)
        if self.use_ram_filesystem and shm.is_dir():
            return shm
        return self.work_dir

    def allowed_whisper_models(self) -> tuple[str, ...]:
        return (self.whisper_model, *self.whisper_models)


def library_environment(settings: Settings) -> dict[str, str]:
    """Variables the model libraries read when imported: with downloads off, huggingface_hub,
    transformers and diffusers never reach the network (not even for request headers)."""
    if settings.allow_model_download:
        return {}
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1"}


class _Env:
    """Reads variables from one mapping, naming the variable in every error."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def get(self, name: str, parse: Callable[[str], T], default: T, *, blank: Any = _UNSET) -> T:
        raw = self._environ.get(name)
        if raw is None:
            return default
        if raw.strip() == "":
            return default if blank is _UNSET else blank
        try:
            return parse(raw)
        except ValueError as exc:
            raise SettingsError(f"{name}={raw!r} is invalid: {exc}") from exc

    def text(self, name: str) -> str | None:
        raw = self._environ.get(name, "").strip()
        return raw or None


def _bucket(env: _Env) -> BucketSettings | None:
    """The operator's bucket, from BUCKET_VARIABLES, which runpod's rp_upload reads (BUCKET_NAME optional)."""
    endpoint, access_key, secret, name, region_set = (env.text(n) for n in BUCKET_VARIABLES)
    if access_key is None and secret is None and name is None:
        return None
    credentials = zip(BUCKET_VARIABLES[1:3], (access_key, secret), strict=True)
    missing = [variable for variable, value in credentials if not value]
    if missing:
        raise SettingsError(f"bucket configuration is incomplete: {', '.join(missing)} not set")
    assert access_key and secret
    region = None
    if endpoint is not None:
        endpoint, hosted, region = split_bucket_endpoint(endpoint)
        if hosted and name and hosted != name:
            raise SettingsError(f"BUCKET_ENDPOINT_URL names bucket {hosted!r} but BUCKET_NAME is {name!r}")
        name = name or hosted
    return BucketSettings(endpoint_url=endpoint, access_key_id=access_key, secret_access_key=secret, name=name,
                          region=region_set or region)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Parse the settings from ``environ`` (default: ``os.environ``)."""
    settings = _read(_Env(os.environ if environ is None else environ))
    _check_prefixes(settings)
    if settings.video_group_offload != "none" and settings.enable_cpu_offload:
        raise SettingsError("VIDEO_GROUP_OFFLOAD and ENABLE_CPU_OFFLOAD are two ways of offloading: choose one")
    served = settings.allowed_whisper_models()
    for name, target in settings.whisper_model_map:
        if target not in served:
            raise SettingsError(f"WHISPER_MODEL_MAP maps {name!r} to {target!r}, which is not served "
                                f"(WHISPER_MODEL, WHISPER_MODELS: {', '.join(served)})")
    return settings


def _check_prefixes(settings: Settings) -> None:
    """Outputs, uploads and cache entries each under a prefix of their own: ``delete_after_read``
    deletes only uploads, and a cache entry must never be an output or an upload."""
    prefixes = {"BUCKET_PREFIX": settings.bucket_prefix, "UPLOAD_PREFIX": settings.upload_prefix,
                "RESULT_CACHE_PREFIX": settings.result_cache_prefix}
    for name, prefix in prefixes.items():
        for other, other_prefix in prefixes.items():
            if name != other and (prefix == other_prefix or f"{prefix}/".startswith(f"{other_prefix}/")):
                raise SettingsError(f"{name}={prefix!r} overlaps {other}={other_prefix!r}: "
                                    "outputs, uploads and cache entries need prefixes of their own")


def shaping(task: str) -> tuple[str, ...]:
    """The settings that shape ``task``'s results (its result cache key holds them), in declaration order."""
    return tuple(f.name for f in fields(Settings) if task in f.metadata["shapes"])


def variables() -> tuple[str, ...]:
    """Every environment variable the settings read, in declaration order."""
    return tuple(variable.env for variable in documented())


def documented() -> tuple[Variable, ...]:
    """Every variable the settings read, with what it is for and its default, in declaration order."""
    found: list[Variable] = []
    for declared in fields(Settings):
        found += declared.metadata.get("variables", ())
        if "env" in declared.metadata:
            found.append(Variable(declared.metadata["env"], declared.metadata["about"],
                                  declared.metadata["default_words"], _default(declared)))
    return tuple(found)


def defaults() -> dict[str, Any]:
    """What each declared variable means when it is not set (the bucket's have none: no bucket)."""
    return {f.metadata["env"]: _default(f) for f in fields(Settings) if "env" in f.metadata}


def _read(env: _Env) -> Settings:
    values = {f.name: env.get(f.metadata["env"], f.metadata["parse"], _default(f), blank=f.metadata["blank"])
              for f in fields(Settings) if "env" in f.metadata}
    return Settings(**values, bucket=_bucket(env))


def _default(declared: Field[Any]) -> Any:
    if declared.default_factory is not MISSING:
        return declared.default_factory()
    return declared.default
