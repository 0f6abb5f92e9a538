"""Where to cut a recording into windows of at most 30 s for batched Whisper decoding.

Two ways, both returning :class:`Chunk` spans of the original audio (16 kHz mono float32),
in time order, never overlapping, each at most ``max_chunk_s`` long:

- :func:`speech_chunks` (``enable_vad``): Silero VAD finds the speech; neighbouring speech
  regions are merged greedily into chunks of up to ``max_chunk_s``. Cuts fall only in silence
  between regions. A region longer than ``max_chunk_s`` is split by Silero itself
  (``max_speech_duration_s``) at the last pause over ~100 ms before the limit, and only where
  there is none, hard at the limit. Silence and non-speech noise give no chunks at all.
- :func:`fixed_chunks` (VAD off): consecutive windows of ``max_chunk_s``, each cut moved back to
  the quietest 100 ms within ``search_s`` (8 s) before the boundary. In continuous speech with no
  pause in that stretch a cut can still land inside a word; that word may then be lost or garbled.
  With a 2 s search, cuts landed inside phrases of real speech often enough to show in the WER
  (bench/RESULTS.md), and the longer search changed no time that could be told apart.

The Silero model ships inside the ``silero_vad`` wheel (no download) and is loaded on first use.
It is small and runs on the CPU, on one thread. Silero's own loop calls the model once per 32 ms
window (its recurrent state carried from call to call): thousands of tiny calls for a few minutes of
audio. :func:`speech_probabilities` runs the same modules on the whole recording at once instead
(:class:`SileroPass`), only the recurrence stepping through the windows, inside one LSTM call.

A recording is not cut into parts run side by side: a second copy starting afresh mid-recording
placed region ends one step differently for minutes after the cut, and those chunks were
transcribed less accurately, for little time gained (bench/RESULTS.md).
"""

from __future__ import annotations

import itertools
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from handler.cancel import CancelToken
from handler.runtime.threads import one_torch_thread

SAMPLE_RATE = 16000
MAX_CHUNK_S = 30.0
# Silero's window at 16 kHz (32 ms), and the samples of the window before it that each call sees first.
_WINDOW = 512
_CONTEXT = 64
# Windows run through the model at once: about a minute of audio, so a cancelled job stops within one block.
_BLOCK = 2048

_model: SileroPass | None = None
_model_load_lock = threading.Lock()  # guards loading ``_model`` (once per process)


@dataclass(frozen=True)
class Chunk:
    """A span ``[start, end)`` of the recording, in samples at 16 kHz."""

    start: int
    end: int

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE


class SileroPass:
    """Silero VAD's 16 kHz model (silero_vad 6.x's TorchScript), run on many windows at once.

    Silero's ``forward`` for one window: the window with the last 64 samples of the one before
    (zeros first) through the STFT features and the encoder, then an LSTM cell from the previous
    window's state, then the output head. Everything but the cell depends only on the audio, so it
    runs on a block of windows as a batch; the cell's weights, in an ``nn.LSTM``, step through the
    block's windows in one call. Equal to Silero's own loop within float rounding (a test compares
    them on real speech, and the chunks they give).
    """

    def __init__(self, silero: Any) -> None:
        self._model = silero._model  # the 16 kHz network; the wrapper around it keeps per-call state
        cell = self._model.decoder.rnn
        self._lstm = torch.nn.LSTM(cell.input_size, cell.hidden_size, batch_first=True)
        with torch.no_grad():
            for mine, theirs in (("weight_ih_l0", "weight_ih"), ("weight_hh_l0", "weight_hh"),
                                 ("bias_ih_l0", "bias_ih"), ("bias_hh_l0", "bias_hh")):
                getattr(self._lstm, mine).copy_(getattr(cell, theirs))
        self._lstm.eval()

    def probabilities(self, samples: torch.Tensor, *, cancel: CancelToken | None = None) -> list[float]:
        """The speech probability of each 512-sample window of ``samples`` (the last one zero-padded)."""
        windows = -(-len(samples) // _WINDOW)
        padded = torch.nn.functional.pad(samples, (0, windows * _WINDOW - len(samples))).view(windows, _WINDOW)
        contexts = torch.cat([torch.zeros(1, _CONTEXT), padded[:-1, -_CONTEXT:]])
        frames = torch.cat([contexts, padded], dim=1)
        found: list[float] = []
        state = None
        with torch.no_grad():
            for start in range(0, windows, _BLOCK):
                if cancel is not None:
                    cancel.check()
                block = frames[start:start + _BLOCK]
                features = self._model.encoder(self._model.run_extractors(block)).squeeze(-1)
                hidden, state = self._lstm(features.unsqueeze(0), state)
                heads = self._model.decoder.decoder(hidden.squeeze(0).unsqueeze(-1))
                found += heads.squeeze(1).mean(dim=1).tolist()
        return found


def _vad_model() -> SileroPass:
    """Silero VAD, loaded on first use (double-checked: look, lock, look again, load, publish)."""
    global _model
    if _model is not None:
        return _model
    with _model_load_lock:
        if _model is None:
            _model = SileroPass(_load_model())
        return _model


def _load_model() -> Any:
    # Importing silero_vad runs torch.set_num_threads(1), which would leave the importing thread
    # (and threads started after it) on one core: the setting is put back.
    with one_torch_thread():
        from silero_vad import load_silero_vad  # type: ignore[import-untyped]

        with warnings.catch_warnings():
            # The wheel ships TorchScript; torch 2.13 deprecates torch.jit.load but loads it fine.
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            return load_silero_vad()


def speech_probabilities(audio: np.ndarray, *, cancel: CancelToken | None = None) -> list[float]:
    """Silero's speech probability of each 32 ms window of ``audio``: its one pass over the recording,
    as ``get_speech_timestamps`` makes it (:class:`SileroPass`). A cancelled job's pass stops within
    a block of windows.

    One pass serves several ways of reading it (:func:`speech_regions`' ``probabilities``): a
    diarized job's decoding chunks and its speaker regions come from the same pass. Concurrent jobs'
    passes run at once through the one model: a pass keeps its state to itself.
    """
    model = _vad_model()  # first: it imports silero_vad without its side effect on torch threads
    if len(audio) == 0:
        return []
    samples = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    with one_torch_thread():  # concurrent jobs' passes, and the decoding beside them, each keep a core
        return model.probabilities(samples, cancel=cancel)


def speech_regions(
    audio: np.ndarray,
    *,
    max_region_s: float = MAX_CHUNK_S,
    threshold: float = 0.5,
    min_silence_ms: int = 300,
    speech_pad_ms: int = 200,
    cancel: CancelToken | None = None,
    probabilities: list[float] | None = None,
) -> list[Chunk]:
    """Silero's speech regions, each padded by ``speech_pad_ms`` and at most ``max_region_s`` long.

    ``probabilities``: the pass of :func:`speech_probabilities` over ``audio``, when it is already
    made (the regions are then the same as without it, without a second pass).

    A longer region is cut at its last pause of ~100 ms before the limit: the last, not the
    longest, so chunks come out near the limit and fewer windows need decoding.

    A pause must last ``min_silence_ms`` to end a region. Neighbours closer than twice the pad
    share the gap between them at its middle.
    """
    _vad_model()  # first: it imports silero_vad without its side effect on torch threads
    from silero_vad import get_speech_timestamps_from_probs

    if probabilities is None:
        probabilities = speech_probabilities(audio, cancel=cancel)
    spans = get_speech_timestamps_from_probs(
        probabilities, sampling_rate=SAMPLE_RATE, threshold=threshold, max_speech_duration_s=max_region_s,
        min_silence_duration_ms=min_silence_ms, speech_pad_ms=speech_pad_ms,
        use_max_poss_sil_at_max_speech=False, audio_length_samples=len(audio),
    )
    return [Chunk(int(span["start"]), int(span["end"])) for span in spans]


def merge_regions(regions: list[Chunk], *, max_samples: int) -> list[Chunk]:
    """Neighbouring regions joined greedily while the joined span stays within ``max_samples``.

    The silence between two chunks belongs to neither. A region over the limit (Silero keeps
    them under it; this is the guard) is cut hard into equal parts.
    """
    chunks: list[Chunk] = []
    for part in (part for region in regions for part in _split_hard(region, max_samples)):
        if chunks and part.end - chunks[-1].start <= max_samples:
            chunks[-1] = Chunk(chunks[-1].start, part.end)
        else:
            chunks.append(part)
    return chunks


def _split_hard(region: Chunk, max_samples: int) -> list[Chunk]:
    parts = math.ceil((region.end - region.start) / max_samples)
    if parts <= 1:
        return [region]
    bounds = np.linspace(region.start, region.end, parts + 1).round().astype(int)
    return [Chunk(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def speech_chunks(audio: np.ndarray, *, max_chunk_s: float = MAX_CHUNK_S, **vad: Any) -> list[Chunk]:
    """Speech of ``audio`` as chunks of at most ``max_chunk_s``, cut only in pauses.

    ``vad`` passes ``threshold``, ``min_silence_ms``, ``speech_pad_ms``, ``cancel`` or ``probabilities``
    on to :func:`speech_regions`. Audio with no speech gives ``[]``.
    """
    _check_window(max_chunk_s)
    regions = speech_regions(audio, max_region_s=max_chunk_s, **vad)
    return merge_regions(regions, max_samples=int(max_chunk_s * SAMPLE_RATE))


def fixed_chunks(
    audio: np.ndarray, *, max_chunk_s: float = MAX_CHUNK_S, search_s: float = 8.0, frame_ms: int = 100
) -> list[Chunk]:
    """The whole of ``audio`` in consecutive chunks of at most ``max_chunk_s``.

    Each cut sits in the middle of the quietest ``frame_ms`` (by mean energy) among the last
    ``search_s`` before the window's limit, so a pause near the boundary is where it cuts.
    """
    _check_window(max_chunk_s)
    window, search = int(max_chunk_s * SAMPLE_RATE), int(search_s * SAMPLE_RATE)
    frame = int(frame_ms * SAMPLE_RATE / 1000)
    chunks: list[Chunk] = []
    start = 0
    while len(audio) - start > window:
        cut = _quietest_point(audio, start + max(window - search, frame), start + window, frame)
        chunks.append(Chunk(start, cut))
        start = cut
    if len(audio) > start:
        chunks.append(Chunk(start, len(audio)))
    return chunks


def _quietest_point(audio: np.ndarray, lo: int, hi: int, frame: int) -> int:
    """The centre of the ``frame``-long stretch of lowest energy that lies within ``[lo, hi)``."""
    power = np.square(audio[lo:hi], dtype=np.float64)
    if len(power) < frame:
        return hi
    running = np.concatenate(([0.0], np.cumsum(power)))
    sums = running[frame:] - running[:-frame]  # sums[i]: energy of audio[lo + i : lo + i + frame]
    return lo + int(np.argmin(sums)) + frame // 2


def _check_window(max_chunk_s: float) -> None:
    if not 1.0 <= max_chunk_s <= MAX_CHUNK_S:
        raise ValueError(f"max_chunk_s must be between 1 and {MAX_CHUNK_S} s, not {max_chunk_s!r}")
