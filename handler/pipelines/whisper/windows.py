"""A recording's chunks as Whisper's windows: each chunk's log-mel, padded to 30 s, and its place in
the recording; and the window an unset language is detected on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim
from whisper.model import Whisper

from handler.pipelines.whisper.vad import Chunk


@dataclass(frozen=True)
class Window:
    """A chunk as the model sees it: mel frames ``[seek, seek + frames)``, padded to 30 s."""

    seek: int
    frames: int
    end_s: float  # where the chunk's audio ends; no timestamp goes past it

    @property
    def offset_s(self) -> float:
        return float(self.seek * HOP_LENGTH / SAMPLE_RATE)


@dataclass(frozen=True)
class WindowInput:
    """One chunk ready for the model: its log-mel, padded to 30 s, and its place in the recording."""

    mel: Tensor  # (n_mels, N_FRAMES), on the CPU
    window: Window
    # The tokens it is prompted with (whisper.transcribe's prompt: the initial prompt and the text
    # before it, timestamps included), at most sections.PROMPT_TOKENS; see Sections.
    prompt: tuple[int, ...] = ()


def prepare_windows(model: Whisper, audio: np.ndarray, chunks: Sequence[Chunk]) -> list[WindowInput]:
    """The chunks' log-mel windows, computed on the CPU (before any GPU slot is taken)."""
    mel = log_mel_spectrogram(audio, model.dims.n_mels, padding=N_SAMPLES)
    content_frames = mel.shape[-1] - N_FRAMES
    windows = [_window(chunk, content_frames, len(audio) / SAMPLE_RATE) for chunk in chunks]
    return [WindowInput(pad_or_trim(mel[:, w.seek : w.seek + w.frames], N_FRAMES), w) for w in windows if w.frames > 0]


def _window(chunk: Chunk, content_frames: int, audio_s: float) -> Window:
    seek = min(chunk.start // HOP_LENGTH, content_frames)
    end = min(math.ceil(chunk.end / HOP_LENGTH), content_frames, seek + N_FRAMES)
    return Window(seek, end - seek, min(chunk.end_s, audio_s))


def language_mel(model: Whisper, audio: np.ndarray) -> Tensor:
    """The log-mel of the recording's first 30 s, padded as ``whisper.transcribe`` pads it: the
    window it detects the language on (the first chunk may start later, or end sooner)."""
    mel: Tensor = pad_or_trim(log_mel_spectrogram(audio, model.dims.n_mels, padding=N_SAMPLES), N_FRAMES)
    return mel
