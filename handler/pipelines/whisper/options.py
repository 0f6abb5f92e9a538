"""What a job asks of Whisper's decoding, checked, with ``whisper.transcribe``'s defaults: the
options of every window of a transcription, and how each is handed to upstream's ``DecodingTask``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from whisper.decoding import DecodingOptions, DecodingResult
from whisper.model import Whisper
from whisper.tokenizer import Tokenizer, get_tokenizer

# Rounds of decoding again the tails that windows leave untranscribed (see decoding.decode_windows).
_TAIL_ROUNDS = 3
_DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# DecodingOptions fields taken from ``options`` as they are (None: openai-whisper's default).
_PASSED_ON = ("beam_size", "best_of", "patience", "length_penalty", "suppress_tokens")
_OPTIONS = frozenset({
    *_PASSED_ON, "task", "language", "temperature", "compression_ratio_threshold", "logprob_threshold",
    "no_speech_threshold", "word_timestamps", "initial_prompt", "condition_on_previous_text",
})


@dataclass(frozen=True)
class DecodeOptions:
    """What ``options`` asks of the decoding, checked and with whisper.transcribe's defaults."""

    temperatures: tuple[float, ...]
    compression_ratio_threshold: float | None
    logprob_threshold: float | None
    no_speech_threshold: float | None
    word_timestamps: bool
    language: str | None
    task: str
    prompt: str | None
    dtype: torch.dtype  # of the activations: the mel and the encoder output (compute_types.activation_dtype)
    passed_on: tuple[tuple[str, Any], ...]  # the _PASSED_ON options that are set
    # Decoded without timestamps (False), a window is one segment, its edges the window's; the
    # benchmark measures that against decoding the tails again (bench/accuracy.py).
    timestamps: bool = True
    tail_rounds: int = _TAIL_ROUNDS  # times a window's untranscribed tail is decoded again
    condition: bool = True  # condition_on_previous_text: a window is prompted with the text before it

    @classmethod
    def from_options(cls, model: Whisper, options: Mapping[str, Any], *,
                     dtype: torch.dtype | None = None) -> DecodeOptions:
        """``dtype`` None: float16 on CUDA, else float32."""
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ValueError(f"unknown decoding options: {', '.join(unknown)}")
        language = options.get("language") or (None if model.is_multilingual else "en")
        return cls(
            temperatures=_temperatures(options.get("temperature", _DEFAULT_TEMPERATURES)),
            compression_ratio_threshold=options.get("compression_ratio_threshold", 2.4),
            logprob_threshold=options.get("logprob_threshold", -1.0),
            no_speech_threshold=options.get("no_speech_threshold", 0.6),
            word_timestamps=bool(options.get("word_timestamps", False)),
            language=language,
            task=options.get("task", "transcribe"),
            prompt=options.get("initial_prompt"),
            dtype=(torch.float16 if model.device.type == "cuda" else torch.float32) if dtype is None else dtype,
            passed_on=tuple((key, options[key]) for key in _PASSED_ON if options.get(key) is not None),
            condition=bool(options.get("condition_on_previous_text", True)),
        )

    def at(self, temperature: float, prompt_length: int = 0) -> DecodingOptions:
        """DecodingOptions for one temperature: beams when greedy, best-of when sampling; room
        for a prompt of ``prompt_length`` tokens (each window's own, see batch_task.BatchDecodingTask)."""
        passed_on = dict(self.passed_on)
        if temperature > 0:
            passed_on.pop("beam_size", None)
            passed_on.pop("patience", None)
        else:
            passed_on.pop("best_of", None)
        return DecodingOptions(
            task=self.task, language=self.language, temperature=temperature, prompt=[0] * prompt_length or None,
            fp16=self.dtype == torch.float16, without_timestamps=not self.timestamps, **passed_on,
        )

    def tokenizer(self, model: Whisper) -> Tokenizer:
        """``model``'s tokenizer for this language and task."""
        return get_tokenizer(
            model.is_multilingual, num_languages=model.num_languages, language=self.language, task=self.task
        )

    def needs_fallback(self, result: DecodingResult) -> bool:
        """As whisper.transcribe: too repetitive or too unlikely, unless it is silence."""
        failed = (
            self.compression_ratio_threshold is not None
            and result.compression_ratio > self.compression_ratio_threshold
        ) or (self.logprob_threshold is not None and result.avg_logprob < self.logprob_threshold)
        return failed and not (self._no_speech(result) and self.logprob_threshold is not None
                               and result.avg_logprob < self.logprob_threshold)

    def is_silent(self, result: DecodingResult) -> bool:
        """As whisper.transcribe: skip a window that is likely no speech, unless its text is likely."""
        if not self._no_speech(result):
            return False
        return self.logprob_threshold is None or result.avg_logprob <= self.logprob_threshold

    def _no_speech(self, result: DecodingResult) -> bool:
        return self.no_speech_threshold is not None and result.no_speech_prob > self.no_speech_threshold


def _temperatures(value: float | Sequence[float]) -> tuple[float, ...]:
    temperatures = (float(value),) if isinstance(value, int | float) else tuple(float(t) for t in value)
    if not temperatures:
        raise ValueError("temperature: give at least one temperature")
    return temperatures
