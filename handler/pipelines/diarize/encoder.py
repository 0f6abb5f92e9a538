"""The GE2E voice encoder: 1.6 s of speech in, a 256-number voice embedding out.

The network and its weights are Resemblyzer's (``pretrained.pt`` inside the ``Resemblyzer``
0.1.4 wheel on PyPI, Apache-2.0): a 3-layer LSTM over 40 mel bands, its last hidden state through a
linear layer and a ReLU, L2-normed. Only the weights file is used: the package's own audio module
imports webrtcvad (built from source, no wheel) and librosa, neither needed for what is here.

The features are what Resemblyzer trained on: a power (not log) mel spectrogram, 25 ms Hann
windows every 10 ms, 40 Slaney mel bands over 0-8 kHz, the recording's level first raised to
-30 dBFS (never lowered). The mel bands are built here as librosa builds them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms: one frame per 10 ms
N_MELS = 40
# Frames in one partial utterance, the span the encoder was trained on.
PARTIAL_FRAMES = 160
EMBEDDING_SIZE = 256
_TARGET_DBFS = -30.0


def slaney_mel_filters(*, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """Triangular mel filters ``(n_mels, 1 + n_fft // 2)`` on the Slaney scale with Slaney area
    normalisation (librosa's ``filters.mel`` defaults)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, log_step = min_log_hz / f_sp, np.log(6.4) / 27.0

    def to_mel(hz: np.ndarray) -> np.ndarray:
        return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / log_step,
                        hz / f_sp)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return np.where(mel >= min_log_mel, min_log_hz * np.exp(log_step * (mel - min_log_mel)), f_sp * mel)

    edges = to_hz(np.linspace(to_mel(np.array(0.0)), to_mel(np.array(sample_rate / 2)), n_mels + 2))
    bins = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    widths = np.diff(edges)
    ramps = edges[:, None] - bins[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return filters.astype(np.float32)


_FILTERS = torch.from_numpy(slaney_mel_filters())


def level_gain(speech: np.ndarray) -> float:
    """The factor that raises ``speech`` to -30 dBFS (1.0 when it is already louder, or silent)."""
    rms = float(np.sqrt(np.mean(np.square(speech, dtype=np.float64)))) if speech.size else 0.0
    if rms <= 1e-9:
        return 1.0
    change_db = _TARGET_DBFS - 20.0 * np.log10(rms)
    return float(10 ** (change_db / 20)) if change_db > 0 else 1.0


def mel_frames(audio: np.ndarray) -> torch.Tensor:
    """The power mel spectrogram of ``audio`` (16 kHz), ``(frames, 40)``; frame ``i`` is centred
    on sample ``i * 160``."""
    samples = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    if samples.numel() <= N_FFT // 2:  # reflect padding needs more than half a window
        samples = torch.nn.functional.pad(samples, (0, N_FFT // 2 + 1 - samples.numel()))
    spectrum = torch.stft(samples, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, pad_mode="reflect",
                          return_complex=True)
    power = spectrum.abs() ** 2
    return (_FILTERS @ power).T.contiguous()


class VoiceEncoder(nn.Module):
    """Resemblyzer's network; its state-dict keys (``lstm.*``, ``linear.*``) are the weights file's."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, EMBEDDING_SIZE, 3, batch_first=True)
        self.linear = nn.Linear(EMBEDDING_SIZE, EMBEDDING_SIZE)
        self.relu = nn.ReLU()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(batch, 256)``, L2-normed, of mel windows ``(batch, frames, 40)``."""
        _, (hidden, _) = self.lstm(mels)
        raw: torch.Tensor = self.relu(self.linear(hidden[-1]))
        norm: torch.Tensor = torch.linalg.vector_norm(raw, dim=1, keepdim=True)
        return raw / norm.clamp_min(1e-12)


def load_encoder(weights: Path, device: str) -> VoiceEncoder:
    """The encoder with the weights of ``weights`` (Resemblyzer's checkpoint: ``{"model_state": ...}``)."""
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    state = checkpoint.get("model_state", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{weights}: not a voice encoder checkpoint (no model_state)")
    encoder = VoiceEncoder()
    # The checkpoint also holds GE2E's training-only similarity scale and bias.
    network = {key: value for key, value in state.items() if not key.startswith("similarity_")}
    encoder.load_state_dict(network, strict=True)
    return encoder.to(device).eval()
