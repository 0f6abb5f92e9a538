"""``make bench-gpu``: the GPU run-book, one command for a session that is lent a GPU.

Parts, in order, each with its own time budget (seconds; checked between measurements, so a
part that runs out keeps what it measured and says where it stopped):

- preflight: torch, its CUDA, the GPU; what the other parts will be able to use.
- tests: the ``gpu``-marked tests (real CUDA OOM -> GPU_OOM and recovery, cache hygiene, slots).
- whisper: tiny.en (real weights when MODEL_DIR has them) and a large-v3-turbo-shaped random
  model, sequential ``whisper.transcribe`` vs batched decoding, real-time factor; 16 one-window jobs
  in one shared batch vs one at a time. A random model says nothing sensible and stops whenever,
  so every window decodes exactly ``TOKENS_PER_WINDOW`` tokens: a logit filter after whisper's own
  suppresses the end-of-text token until then and forces it after. 100 tokens is what 30 s of
  conversational English gives (~150 words a minute, ~1.3 tokens a word), and windows are decoded
  without timestamps so every recording takes the same windows on both paths.
- image: an SDXL-shaped UNet (2.6 B parameters, bf16) at 1024x1024 with classifier-free guidance,
  seconds per step and for 30 steps, and the SDXL-shaped VAE decode.
- video: a Wan2.1-1.3B-shaped transformer at 480p (832x480), 81 frames, bf16: seconds per step
  (two passes: guidance), extrapolated to 30 steps; with First Block Cache and regional compilation
  as far as the budget allows; the Wan VAE decode in fp32.
- memory: the mixed sequence of tasks at the defaults' real shapes under a 24 GB GPU's budget
  (handler.runtime.residency), each job's working memory allocated for real: no GPU_OOM, and the
  time to park each pipeline in host RAM and bring it back.

Random weights at real shapes are built on the device (nothing to download). Results go, as a
table, into bench/RESULTS.md's GPU section (``--out`` elsewhere), rewritten after every row, so a
run killed from outside still leaves what it measured. ``BENCH_GPU_DRY_RUN=1`` runs every part at
tiny shapes on the CPU (the suite does, tests/test_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from testkit import default_models

RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- bench-gpu:start -->", "<!-- bench-gpu:end -->"
TOKENS_PER_WINDOW = 100
# 450 s in all: the device command's timeout (bench/README.md) leaves room in a session's 15 device minutes
# for the machine's start and a rerun of a part.
BUDGETS_S = {"preflight": 15, "tests": 75, "whisper": 110, "image": 60, "video": 120, "memory": 70}
TEST_LOG = Path(__file__).with_name("out") / "gpu-tests.log"
DRY_BUDGETS_S = {"preflight": 30, "tests": 45, "whisper": 30, "image": 10, "video": 15, "memory": 10}


class OutOfTime(Exception):
    """A part used its budget; what it measured so far stays in the table."""


@dataclass
class Part:
    """One part of the run-book: its rows, its budget and its clock."""

    name: str
    budget_s: float
    report: Callable[[], None]
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, measurement: str, value: str, notes: str = "") -> None:
        self.rows.append((measurement, value, notes))
        self.report()

    def check(self) -> None:
        if time.monotonic() - self.started > self.budget_s:
            raise OutOfTime

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def dry_run() -> bool:
    return os.environ.get("BENCH_GPU_DRY_RUN", "").strip().lower() in ("1", "true", "yes")


def device() -> str:
    return "cuda" if torch.cuda.is_available() and not dry_run() else "cpu"


def sync() -> None:
    if device() == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], *, runs: int, part: Part) -> float:
    """Median seconds of ``runs`` calls after one warm-up call (none in a dry run, which tests the
    harness, not the figures); stops when the part is out of time."""
    if not dry_run():
        fn()
        sync()
    times = []
    for _ in range(runs):
        part.check()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


# --- preflight and tests ----------------------------------------------------------------------

def preflight(part: Part) -> None:
    part.add("torch", f"{torch.__version__} (CUDA build {torch.version.cuda})")
    if device() == "cuda":
        props = torch.cuda.get_device_properties(0)
        part.add("GPU", f"{props.name}, {props.total_memory / 2**30:.0f} GiB")
    else:
        part.add("GPU", "none", "dry run on the CPU" if dry_run() else "CUDA is not available")
    for module in ("whisper", "diffusers", "transformers"):
        try:
            version = __import__(module).__version__
        except ImportError as exc:
            version = f"missing ({exc})"
        part.add(module, str(version))


def gpu_tests(part: Part) -> None:
    """The gpu-marked tests, one row for each test's outcome; pytest's whole output in ``TEST_LOG``."""
    command = [sys.executable, "-m", "pytest", "-q", "-rA", "-m", "gpu", "-p", "no:cacheprovider",
               "tests/test_gpu.py"]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, part.budget_s - 5),
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired as exc:
        save_log(exc.stdout, exc.stderr)
        part.add("gpu-marked tests", "timed out", f"over {part.budget_s - 5:.0f} s; output in {TEST_LOG.name}")
        return
    save_log(done.stdout, done.stderr)
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    part.add("gpu-marked tests", summary, f"exit {done.returncode}, {time.monotonic() - started:.1f} s")
    for outcome, test, reason in pytest_outcomes(done.stdout):
        part.add(test, outcome, reason[:160])


def save_log(stdout: str | bytes | None, stderr: str | bytes | None) -> None:
    def text(value: str | bytes | None) -> str:
        return value.decode(errors="replace") if isinstance(value, bytes) else value or ""

    TEST_LOG.parent.mkdir(exist_ok=True)
    TEST_LOG.write_text(text(stdout) + "\n--- stderr ---\n" + text(stderr))


def pytest_outcomes(stdout: str) -> list[tuple[str, str, str]]:
    """(outcome, test, reason) from the short summary that ``pytest -rA`` ends with."""
    rows = []
    for line in stdout.splitlines():
        outcome, _, rest = line.partition(" ")
        if outcome not in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"):
            continue
        test, _, reason = rest.partition(" - ")
        rows.append((outcome, test.split("::")[-1] if "::" in test else test, reason.replace("|", "/")))
    return rows


# --- whisper --------------------------------------------------------------------------------

TURBO_DIMS = dict(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
                  n_vocab=51866, n_text_ctx=448, n_text_state=1280, n_text_head=20, n_text_layer=4)
TINY_EN_DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
                    n_vocab=51864, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4)
DRY_DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
                n_vocab=51864, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1)


def random_whisper(dims: dict[str, int]) -> Any:
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    model = Whisper(ModelDimensions(**dims))
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)  # torch.empty otherwise
    return model.to(device())


def whisper_models() -> Iterator[tuple[str, Any]]:
    if dry_run():
        yield "random tiny (dry run)", random_whisper(DRY_DIMS)
        return
    from handler.pipelines.whisper.pipeline import load_checkpoint

    compact = os.environ.get("BENCH_GPU_WEIGHTS")  # the int8 copy that gpu-bundle carries
    path = Path(os.environ.get("MODEL_DIR", "models")) / "whisper" / "tiny.en.pt"
    if compact and Path(compact).is_file():
        from bench.gpu_bundle import load_compact

        yield "tiny.en (real weights, carried as int8)", load_compact(Path(compact), device())
    elif path.is_file():
        yield "tiny.en (real weights)", load_checkpoint(path, device())
    else:
        yield "tiny.en-shaped (random: no weights carried)", random_whisper(TINY_EN_DIMS)
    yield "large-v3-turbo-shaped (random)", random_whisper(TURBO_DIMS)


@contextlib.contextmanager
def fixed_tokens(count: int) -> Iterator[None]:
    """Every decode (sequential or batched) yields exactly ``count`` tokens per window."""
    from whisper.decoding import DecodingTask, LogitFilter

    class FixedLength(LogitFilter):  # type: ignore[misc]  # whisper ships no type hints
        def __init__(self, eot: int, sample_begin: int) -> None:
            self.eot, self.sample_begin = eot, sample_begin

        def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
            if tokens.shape[-1] - self.sample_begin < count:
                logits[:, self.eot] = -np.inf
            else:
                logits[:] = -np.inf
                logits[:, self.eot] = 0

    original = DecodingTask.__init__

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.logit_filters.append(FixedLength(self.tokenizer.eot, self.sample_begin))

    DecodingTask.__init__ = patched
    try:
        yield
    finally:
        DecodingTask.__init__ = original


def whisper_bench(part: Part) -> None:
    import whisper

    from handler.pipelines.whisper import compute_types, decoding
    from handler.pipelines.whisper.options import DecodeOptions
    from handler.pipelines.whisper.vad import Chunk
    from handler.pipelines.whisper.windows import prepare_windows

    fp16 = device() == "cuda"
    seconds = 30 if dry_run() else 300
    rate = whisper.audio.SAMPLE_RATE
    audio = np.random.default_rng(0).normal(0, 0.05, seconds * rate).astype(np.float32)
    chunks = [Chunk(start, min(start + 30 * rate, len(audio))) for start in range(0, len(audio), 30 * rate)]
    tokens = 8 if dry_run() else TOKENS_PER_WINDOW
    with fixed_tokens(tokens):
        for label, model in whisper_models():
            part.check()
            options: dict[str, Any] = {"temperature": 0.0, "language": "en"}
            dtype = torch.float16 if fp16 else torch.float32
            settings = replace(DecodeOptions.from_options(model, options, dtype=dtype), timestamps=False)
            inputs = prepare_windows(model, audio, chunks)

            def sequential(model: Any = model, options: dict[str, Any] = options) -> object:
                return whisper.transcribe(model, audio, fp16=fp16, without_timestamps=True,
                                          condition_on_previous_text=False, verbose=None, **options)

            def batched(model: Any = model, settings: Any = settings, inputs: Any = inputs) -> object:
                return decoding.decode_windows(model, inputs, settings)

            runs = 1 if dry_run() else 2
            seq = timed(sequential, runs=runs, part=part)
            part.add(f"{label}: sequential whisper.transcribe", f"RTF {seconds / seq:.1f}",
                     f"{seconds} s of audio in {seq:.2f} s, {tokens} tokens a window")
            bat = timed(batched, runs=runs, part=part)
            part.add(f"{label}: batched decode ({len(inputs)} windows)", f"RTF {seconds / bat:.1f}",
                     f"{bat:.2f} s, {seq / bat:.2f}x sequential")
            # The number formats a job may ask for (compute_type), each a converted copy: float16 against
            # bfloat16 on CUDA, float32 against int8 on the CPU (the dry run).
            for compute_type in ("float16", "bfloat16") if device() == "cuda" else ("float32", "int8"):
                part.check()
                converted = compute_types.convert(copy.deepcopy(model), compute_type)
                options_in = replace(DecodeOptions.from_options(
                    converted, options, dtype=compute_types.activation_dtype(compute_type)), timestamps=False)
                took = timed(lambda m=converted, o=options_in, i=inputs: decoding.decode_windows(m, i, o), runs=runs,
                             part=part)
                part.add(f"{label}: batched decode in {compute_type}", f"RTF {seconds / took:.1f}",
                         f"{took:.2f} s, {seq / took:.2f}x sequential")
                del converted
            jobs = [inputs[i % len(inputs)] for i in range(4 if dry_run() else 16)]

            def one_at_a_time(model: Any = model, settings: Any = settings, jobs: Any = jobs) -> None:
                for item in jobs:
                    decoding.decode_windows(model, [item], settings)

            def shared(model: Any = model, settings: Any = settings, jobs: Any = jobs) -> object:
                return decoding.decode_windows(model, jobs, settings)

            alone = timed(one_at_a_time, runs=1, part=part)
            together = timed(shared, runs=1, part=part)
            part.add(f"{label}: {len(jobs)} one-window jobs, shared batch", f"{len(jobs) / together:.1f} jobs/s",
                     f"{together:.2f} s vs {alone:.2f} s one at a time ({alone / together:.2f}x)")
            del model
            torch.cuda.empty_cache() if device() == "cuda" else None


# --- image ----------------------------------------------------------------------------------

def sdxl_unet(dry: bool) -> Any:
    from diffusers import UNet2DConditionModel

    if dry:
        return UNet2DConditionModel(
            block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=2,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
            attention_head_dim=(2, 4), use_linear_projection=True)
    return default_models.sdxl_unet()


def image_bench(part: Part) -> None:
    from diffusers import AutoencoderKL

    dry, dev = dry_run(), device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    with torch.device(dev):
        unet = sdxl_unet(dry).to(dtype).eval()
    side = 8 if dry else 128  # latent side: 1024 px
    context, pooled = (32, 32) if dry else (2048, 1280)  # 6 time ids x addition_time_embed_dim + pooled
    latents = torch.randn(2, 4, side, side, device=dev, dtype=dtype)
    embeds = torch.randn(2, 77, context, device=dev, dtype=dtype)
    extra = {"text_embeds": torch.randn(2, pooled, device=dev, dtype=dtype),
             "time_ids": torch.randn(2, 6, device=dev, dtype=dtype)}
    params = sum(p.numel() for p in unet.parameters()) / 1e9
    part.check()
    with torch.inference_mode():
        step = timed(lambda: unet(latents, 500, embeds, added_cond_kwargs=extra), runs=1 if dry else 3, part=part)
    part.add(f"SDXL-shaped UNet ({params:.2f} B params, {dtype}) step, guidance batch 2",
             f"{step:.3f} s", f"30 steps: {30 * step:.1f} s at {side * 8}x{side * 8}")
    with torch.device(dev):
        vae = (AutoencoderKL(block_out_channels=[4, 8], norm_num_groups=2, latent_channels=4,
                             down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
               if dry else AutoencoderKL(block_out_channels=[128, 256, 512, 512], latent_channels=4,
                                         down_block_types=["DownEncoderBlock2D"] * 4,
                                         up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2)).to(dtype)
    with torch.inference_mode():
        decode = timed(lambda: vae.decode(latents[:1]), runs=1, part=part)
    part.add("SDXL-shaped VAE decode, one image", f"{decode:.3f} s")


# --- video ----------------------------------------------------------------------------------

def wan_transformer(dry: bool) -> Any:
    from diffusers import WanTransformer3DModel

    if dry:
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return default_models.wan_transformer()  # Wan2.1-T2V-1.3B's config


def video_bench(part: Part) -> None:
    from diffusers import AutoencoderKLWan, FirstBlockCacheConfig

    dry, dev = dry_run(), device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    with torch.device(dev):
        transformer = wan_transformer(dry).to(dtype).eval()
    frames, height, width = (9, 64, 64) if dry else (81, 480, 832)
    shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    latents = torch.randn(*shape, device=dev, dtype=dtype)
    text = torch.randn(1, 512, 32 if dry else 4096, device=dev, dtype=dtype)
    timestep = torch.tensor([500], device=dev)
    steps = 30

    def one_step() -> None:  # guidance: a conditional and an unconditional pass
        for _ in range(2):
            transformer(latents, timestep, text, return_dict=False)

    runs = 1 if dry else 3
    label = f"Wan2.1-1.3B-shaped, {width}x{height}, {frames} frames"
    with torch.inference_mode():
        step = timed(one_step, runs=runs, part=part)
        part.add(f"{label}: step (2 passes)", f"{step:.3f} s", f"{steps} steps: {steps * step:.1f} s")
        transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
        with transformer.cache_context("cond"):
            cached = timed(one_step, runs=runs, part=part)
        transformer.disable_cache()
        part.add(f"{label}: step with First Block Cache", f"{cached:.3f} s",
                 "random weights: skipping is not representative, this is the hook's cost or gain")
        part.check()
        if not dry:
            started = time.perf_counter()
            transformer.compile_repeated_blocks(fullgraph=False, dynamic=False)
            one_step()
            sync()
            part.add(f"{label}: regional compile + first step", f"{time.perf_counter() - started:.1f} s")
            compiled = timed(one_step, runs=runs, part=part)
            part.add(f"{label}: step, compiled", f"{compiled:.3f} s", f"{step / compiled:.2f}x eager")
    part.check()
    with torch.device(dev):
        vae = (AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True]) if dry else AutoencoderKLWan()).float()
    vae.enable_tiling()
    with torch.inference_mode():
        decode = timed(lambda: vae.decode(latents.float()), runs=1, part=part)
    part.add(f"Wan VAE decode (fp32, tiled), {frames} frames", f"{decode:.2f} s")


# --- GPU memory -------------------------------------------------------------------------------

class _Pipeline:
    """A pipeline's weights as one module, moved whole like the worker moves a pipeline."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.moves: list[tuple[str, float]] = []

    def to(self, target: str) -> None:
        started = time.perf_counter()
        self.module.to(target)
        sync()
        self.moves.append((target, time.perf_counter() - started))


def _default_pipelines(dry: bool) -> dict[str, tuple[torch.nn.Module, int]]:
    """Each task's default pipeline at its real shapes (uninitialised weights in host RAM), and its
    working memory at the default request; tiny stand-ins in a dry run."""
    from handler.pipelines.diffusion import loading
    from testkit.default_models import COMPONENTS

    if dry:
        return {task: (torch.nn.Linear(64, 64 * (index + 1)), 2**16)
                for index, task in enumerate(("transcribe", "text2image", "text2video", "speech"))}
    working = {"transcribe": 2 * 10**9, "text2image": loading.image_working_bytes(1024, 1024, 1),
               "text2video": loading.video_working_bytes(832, 480, 81), "speech": 2**28}
    built: dict[str, list[torch.nn.Module]] = {}
    for component in COMPONENTS:
        if component.name == "UMT5-XXL text encoder":
            continue  # offloaded at a 24 GB budget (VIDEO_TEXT_ENCODER_OFFLOAD=auto): it visits, it is not placed
        with torch.device("meta"):
            module = component.build()
        built.setdefault(component.task, []).append(module.to_empty(device="cpu").to(component.dtype))
    return {task: (torch.nn.ModuleList(modules), working[task]) for task, modules in built.items()}


def _text_encoder_offload(part: Part, dry: bool, dev: str) -> None:
    """What VIDEO_TEXT_ENCODER_OFFLOAD costs a video job: one prompt encode (512 tokens) by UMT5-XXL
    under the leaf offload hooks against the encoder placed on the device (twice a job with a
    negative prompt)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from handler.pipelines.diffusion import speedups

    config = (UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4) if dry else
              UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                         feed_forward_proj="gated-gelu"))
    dtype = torch.float32 if dry else torch.bfloat16
    with torch.device("meta"):
        encoder = UMT5EncoderModel(config)
    encoder = encoder.to_empty(device=dev).to(dtype).eval()
    for parameter in encoder.parameters():  # uninitialised memory may hold NaNs; filled where it is fast
        parameter.data.normal_(0, 0.02)
    tokens = torch.randint(0, config.vocab_size, (1, 16 if dry else 512), device=dev)
    with torch.inference_mode():
        placed = timed(lambda: encoder(tokens), runs=1 if dry else 3, part=part)
        encoder.to("cpu")
        speedups.offload_component(encoder, dev)
        offloaded = timed(lambda: encoder(tokens), runs=1 if dry else 3, part=part)
    part.add("UMT5-XXL prompt encode: offloaded vs placed", f"{offloaded:.2f} s vs {placed:.2f} s",
             f"{offloaded - placed:+.2f} s a prompt (a job with a negative prompt encodes two)")


def memory_bench(part: Part) -> None:
    """The mixed sequence (image, video, transcription, speech, image, video) at the defaults' real
    shapes under a 24 GB GPU's budget: each job's working memory really allocated while it holds its
    pipeline; no GPU_OOM, what is counted stays within the budget; park and restore times."""
    from handler.runtime.instances import InstancePool, Placement, move_whole
    from handler.runtime.memory import module_bytes
    from handler.runtime.registry import PipelineKey
    from handler.runtime.residency import Residency

    dry, dev = dry_run(), device()
    budget = 2**20 if dry else 22 * 2**30
    if dev == "cuda":
        budget = min(budget, torch.cuda.get_device_properties(0).total_memory - 2 * 2**30)
    memory = Residency(device=dev, budget=budget, host_reserve=0)
    pools = {}
    for task, (module, working) in _default_pipelines(dry).items():
        pool = InstancePool([_Pipeline(module)], Placement(weights=module_bytes(module), move=move_whole))
        pool.key = PipelineKey(task, task, dev, "bfloat16")
        pools[task] = (pool, working)
        part.check()
    peak = 0
    for task in ("text2image", "text2video", "transcribe", "speech", "text2image", "text2video"):
        pool, working = pools[task]
        with memory.hold(pool, working=working, timeout=60):
            activations = torch.empty(working, dtype=torch.uint8, device=dev)
            sync()
            peak = max(peak, memory.used())
            del activations
        part.check()
    part.add("mixed sequence, 24 GB budget", f"{peak / 2**30:.1f} GiB counted at most",
             f"budget {budget / 2**30:.1f} GiB; no GPU_OOM")
    _text_encoder_offload(part, dry, dev)
    for task, (pool, _) in pools.items():
        moves = pool.first.moves
        to_device = [s for target, s in moves if target == dev]
        parked = [s for target, s in moves if target == "cpu"]
        part.add(f"{task}: {pool.weights / 2**30:.2f} GiB of weights",
                 f"to device {np.median(to_device):.2f} s" if to_device else "never placed",
                 f"park {np.median(parked):.2f} s" if parked else "never parked")


# --- the table --------------------------------------------------------------------------------

PARTS: dict[str, Callable[[Part], None]] = {
    "preflight": preflight, "tests": gpu_tests, "whisper": whisper_bench, "image": image_bench, "video": video_bench,
    "memory": memory_bench,
}


def table(parts: list[Part], *, finished: bool) -> str:
    mode = "dry run, tiny shapes on the CPU" if dry_run() else "GPU"
    lines = [START, f"Run {time.strftime('%Y-%m-%d %H:%M')} ({mode}){'' if finished else ', in progress'}.", "",
             "| part | measurement | value | notes |", "| --- | --- | --- | --- |"]
    for part in parts:
        for measurement, value, notes in part.rows:
            lines.append(f"| {part.name} | {measurement} | {value} | {notes} |")
    lines.append(END)
    return "\n".join(lines)


def write(out: Path, parts: list[Part], *, finished: bool) -> None:
    """Replace the GPU section's table in ``out`` (append the section when it has none)."""
    text = out.read_text() if out.exists() else ""
    block = table(parts, finished=finished)
    if START in text and END in text:
        head, _, rest = text.partition(START)
        text = head + block + rest.partition(END)[2]
    else:
        text = text.rstrip() + "\n\n## GPU run-book (`make bench-gpu`, bench/gpu.py)\n\n" + block + "\n"
    out.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("parts", nargs="*", help=f"some of: {', '.join(PARTS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts: {', '.join(unknown)}")
    from bench.common import quiet_logs

    quiet_logs()
    budgets = DRY_BUDGETS_S if dry_run() else BUDGETS_S
    parts: list[Part] = []
    for name in args.parts or list(PARTS):
        part = Part(name, budgets[name], report=lambda: write(args.out, parts, finished=False))
        parts.append(part)
        try:
            PARTS[name](part)
        except OutOfTime:
            part.add("stopped", f"budget of {part.budget_s:.0f} s used", "rows above are what it measured")
        except Exception as exc:  # one broken part must not cost the others their minutes
            part.add("failed", type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "")
        part.add("part time", f"{part.elapsed():.1f} s", f"budget {part.budget_s:.0f} s")
        print(f"{name}: {part.elapsed():.1f} s", flush=True)
    write(args.out, parts, finished=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
