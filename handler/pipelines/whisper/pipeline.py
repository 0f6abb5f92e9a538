"""openai-whisper models: how they load, how one runs safely (handler.pipelines.weights finds them).

A checkpoint may carry its own alignment heads (the builder stores them when importing a
CTranslate2 model); otherwise official models get openai-whisper's table.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import whisper
import whisper.timing
from whisper.model import ModelDimensions, Whisper
from whisper.tokenizer import get_tokenizer

from handler.cancel import CancelToken
from handler.config import Settings
from handler.errors import ModelLoadFailed
from handler.logs import get_logger
from handler.pipelines.weights import whisper_checkpoint, whisper_dir
from handler.pipelines.whisper import compute_types, decoding
from handler.pipelines.whisper.options import DecodeOptions
from handler.pipelines.whisper.vad import Chunk
from handler.runtime.container import Runtime
from handler.runtime.instances import InstancePool, Placement, move_whole
from handler.runtime.memory import module_bytes
from handler.runtime.registry import PipelineKey

log = get_logger(__name__)
# numba's options (NUMBA_CACHE_DIR ...), set on the module at run time: no attributes mypy can see.
_NUMBA_CONFIG: ModuleType = importlib.import_module("numba.core.config")


def compiled_dir(model_dir: Path) -> Path:
    """Where numba keeps the word-alignment code it compiled (see :func:`cache_compiled_alignment`)."""
    return whisper_dir(model_dir) / "compiled"


def cache_compiled_alignment(directory: Path) -> None:
    """Keep numba's compiled word-alignment DTW on disk, so a process loads it instead of compiling it.

    openai-whisper jits ``timing.dtw_cpu`` without numba's cache, so every process paid for LLVM
    compilation on its first word timings on the CPU (bench/RESULTS.md, cold start). numba keys each entry on the source
    file and the CPU: another whisper version or processor compiles again (and adds its entry)
    rather than loading code that does not fit. NUMBA_CACHE_DIR, when set, is kept.
    """
    if not _NUMBA_CONFIG.CACHE_DIR:
        # Read when caching is enabled, as NUMBA_CACHE_DIR is; a module attribute typeshed cannot type.
        _NUMBA_CONFIG.CACHE_DIR = str(directory)  # type: ignore[attr-defined]
    whisper.timing.dtw_cpu.enable_caching()


def load_checkpoint(path: Path, device: str, *, default_heads: bytes | None = None) -> Whisper:
    """Build a Whisper model from a checkpoint file (weights only, no pickled code)."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"])
    heads = checkpoint.get("alignment_heads") or default_heads
    if heads is not None:
        model.set_alignment_heads(heads)
    return model.to(device)


def load_whisper(name: str, settings: Settings, device: str) -> Whisper:
    """Baked weights if present, else the official download when allowed."""
    cache_compiled_alignment(compiled_dir(settings.model_dir))
    path = whisper_checkpoint(name, settings.model_dir)
    if path.is_file():
        return load_checkpoint(path, device, default_heads=whisper._ALIGNMENT_HEADS.get(name))
    if name in whisper._MODELS and settings.allow_model_download:
        return whisper.load_model(name, device=device, download_root=str(path.parent))
    log.warning("whisper.weights_missing", model=name, path=str(path))
    raise ModelLoadFailed(
        f"no weights for Whisper model {name!r} in MODEL_DIR (bake them with builder/, "
        "or allow downloads with ALLOW_MODEL_DOWNLOAD=true)"
    )


@dataclass
class WhisperPipeline:
    """A loaded model that serves one transcription at a time.

    openai-whisper installs key/value-cache hooks on the model during decoding, so one
    instance must never run two decodes at once: each caller holds it borrowed from its
    :class:`~handler.runtime.instances.InstancePool` (see :func:`get_pipelines`).
    """

    model: Whisper
    name: str
    device: str
    # The number format it runs in (compute_types.RUN_TYPES), its weights converted when loaded.
    compute_type: str = "float32"

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype."""
        return compute_types.activation_dtype(self.compute_type)

    @property
    def is_multilingual(self) -> bool:
        return bool(self.model.is_multilingual)

    def to(self, device: str) -> None:
        """Move the weights (the residency parks an idle model in host RAM and brings it back)."""
        self.model.to(device)

    def transcribe(self, audio: np.ndarray, *, cancel: CancelToken, **options: Any) -> dict[str, Any]:
        """Run openai-whisper; stops at the next decoder step once ``cancel`` is set."""
        # whisper.transcribe turns fp16 off (with a warning) for a model on the CPU; it knows no other
        # half format, so bfloat16 weights run with float32 activations there.
        fp16 = self.dtype == torch.float16 and self.device == "cuda"
        with decoding.cancellable(self.model, cancel):
            result: dict[str, Any] = whisper.transcribe(self.model, audio, verbose=None, fp16=fp16, **options)
        return result

    def transcribe_chunks(
        self,
        audio: np.ndarray,
        chunks: Sequence[Chunk],
        *,
        cancel: CancelToken,
        batch_size: int = decoding.DEFAULT_BATCH_SIZE,
        **options: Any,
    ) -> dict[str, Any]:
        """``decoding.transcribe_chunks`` on this instance; same options as :meth:`transcribe`.

        Find the chunks first (``vad.speech_chunks`` or ``vad.fixed_chunks``, on the CPU), outside
        the GPU slot: VAD is seconds of one core's time on a long recording (bench/RESULTS.md).
        """
        return decoding.transcribe_chunks(
            self.model, audio, chunks, options=options, batch_size=batch_size, cancel=cancel, dtype=self.dtype
        )

    def with_language(self, options: DecodeOptions, mel: torch.Tensor) -> DecodeOptions:
        """``options`` with the language known: as given, else detected on ``mel``, the recording's
        first 30 s (``windows.language_mel``)."""
        return decoding.detect_language(self.model, options, mel)

    def warm_up(self) -> None:
        """Pay now, before jobs are taken, what only a first job pays: numba's word-alignment DTW
        (loaded from its cache, or compiled), the tokenizer's vocabulary and the mel filters.

        On the CPU a decode costs the same the first time as later (measured on tiny.en), so none
        is run; on CUDA one batch decode of a second of faint noise loads the kernels it needs.
        """
        model = self.model
        whisper.timing.dtw(torch.zeros(8, 8, device=model.device))
        get_tokenizer(model.is_multilingual, num_languages=model.num_languages, task="transcribe")
        whisper.audio.mel_filters(model.device, model.dims.n_mels)
        if self.device != "cuda":
            return
        noise = np.random.default_rng(0).normal(0, 0.01, whisper.audio.SAMPLE_RATE).astype(np.float32)
        options: dict[str, Any] = {"word_timestamps": True, "beam_size": 1, "temperature": 0.0}
        self.transcribe_chunks(noise, [Chunk(0, len(noise))], cancel=CancelToken(), batch_size=1, **options)


def get_pipelines(runtime: Runtime, model: str, compute_type: str | None = None) -> InstancePool[WhisperPipeline]:
    """The MODEL_INSTANCES loaded copies of ``model`` in ``compute_type`` (resolved:
    ``compute_types.RUN_TYPES``; None: the format of a transcription that names none), loaded on first
    use, for every task that runs Whisper: one pool per model and format, so transcriptions and captions
    borrow from the same copies."""
    settings = runtime.settings
    if compute_type is None:
        compute_type = compute_types.chosen(settings, runtime.device, None,
                                            sequential=settings.whisper_batch_size == 1)

    def load() -> WhisperPipeline:
        # Built in host RAM, converted there (the int8 kernels are the CPU's): the residency places it
        # on the device when a job holds it.
        converted = compute_types.convert(load_whisper(model, settings, "cpu"), compute_type)
        return WhisperPipeline(converted, model, runtime.device, compute_type)

    def placement(pipeline: WhisperPipeline) -> Placement:
        return Placement(weights=module_bytes(pipeline.model), move=move_whole)

    return runtime.registry.get(
        PipelineKey("transcribe", model, runtime.device, compute_type),
        lambda: InstancePool.build(settings.model_instances, load, placement)
    )


def pipeline_working_bytes(pipeline: WhisperPipeline, *, batch: int, beams: int) -> int:
    """:func:`working_bytes` of a loaded model."""
    return working_bytes(pipeline.model.dims, fp16=pipeline.dtype != torch.float32, batch=batch, beams=beams)


def working_bytes(dims: ModelDimensions, *, fp16: bool, batch: int, beams: int) -> int:
    """GPU memory a decode of ``batch`` windows with ``beams`` beams each takes beyond the weights:
    the encoder's activations per window and the decoder's key/value caches per beam (self-attention
    over its 448 text positions, cross-attention over the 1500 audio frames), in the activations' dtype,
    with room for the layer a step runs. An estimate: bench/README's GPU run-book measures it."""
    size = 2 if fp16 else 4
    encoder = dims.n_audio_ctx * dims.n_audio_state * size * 8
    caches = 2 * dims.n_text_layer * (dims.n_text_ctx + dims.n_audio_ctx) * dims.n_text_state * size
    return int(batch * (encoder + max(1, beams) * caches))
