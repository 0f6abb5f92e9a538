"""User media read in: ffprobe and ffmpeg on files a client sent, locked down, with their failures
turned into input errors.

User files are opened with ``-protocol_whitelist file`` and a demuxer whitelist of ordinary
audio/video containers (:data:`LOCKDOWN`), so a playlist, manifest or concat list can never make
ffmpeg open a URL or another local file. Commands are argument lists (ffmpeg-python builds the
decode graph), each run has a deadline, and stderr goes into the error message with every file
path replaced by the input's field name. Nothing above this module knows ffmpeg's exit codes or
messages.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ffmpeg
import numpy as np

from handler.cancel import CancelToken
from handler.errors import InputTooLarge, InvalidInput
from handler.io import media_tools

# Demuxers a user file may be read with: real media containers only. HLS/DASH manifests,
# concat lists, image sequences and every network protocol stay out.
DEMUXER_WHITELIST = ",".join(
    (
        "mov,mp4,m4a,3gp,3g2,mj2",
        "matroska,webm",
        "mp3",
        "wav",
        "w64",
        "ogg",
        "flac",
        "aac",
        "aiff",
        "caf",
        "amr",
        "avi",
        "asf",
        "flv",
        "mpegts",
        "mpeg",
    )
)
# The input options every user file is opened with (media_out's mux of a user's narration too).
LOCKDOWN = {"protocol_whitelist": "file", "format_whitelist": DEMUXER_WHITELIST}
_PLAYLIST_MAGIC = (b"#EXTM3U", b"<?xml", b"<MPD", b"ffconcat", b"[playlist]")
SAMPLE_RATE = 16000
# Decoded audio shorter than this share of the declared duration means a cut-off file.
_MIN_DECODED_SHARE = 0.9


@dataclass(frozen=True)
class MediaInfo:
    """What ffprobe says about a file."""

    format_name: str
    # Container duration, and the longest audio stream's (the container's if not declared).
    duration_s: float
    audio_duration_s: float
    has_audio: bool
    has_video: bool


def _too_slow(field: str, timeout_s: float) -> InvalidInput:
    return InvalidInput(f"{field}: media tool ran longer than {timeout_s:g}s", field=field)


def sniff_playlist(path: Path, *, field: str) -> None:
    """Refuse text playlists and manifests early, with a clear message."""
    with path.open("rb") as fh:
        head = fh.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if any(head.startswith(magic) for magic in _PLAYLIST_MAGIC):
        raise InvalidInput(f"{field}: playlists and manifests are not accepted", field=field)


def _check_file(path: Path, *, field: str) -> None:
    if path.stat().st_size == 0:
        raise InvalidInput(f"{field}: the file is empty", field=field)
    sniff_playlist(path, field=field)


def probe(path: Path, *, timeout_s: float, field: str, cancel: CancelToken | None = None) -> MediaInfo:
    """Probe ``path``; anything that is not readable media is ``INVALID_INPUT``."""
    _check_file(path, field=field)
    return _ffprobe(path, timeout_s=timeout_s, field=field, cancel=cancel)


def _ffprobe(path: Path, *, timeout_s: float, field: str, cancel: CancelToken | None) -> MediaInfo:
    args = ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json"]
    for option, value in LOCKDOWN.items():
        args += [f"-{option}", value]
    code, stdout, stderr = media_tools.run(
        [*args, f"file:{path}"], timeout_s=timeout_s, timeout_error=_too_slow(field, timeout_s), cancel=cancel
    )
    if code != 0:
        raise InvalidInput(f"{field}: not a readable media file ({media_tools.tail(stderr, field)})", field=field)
    return _media_info(stdout, field=field)


def _media_info(raw: bytes, *, field: str) -> MediaInfo:
    data: dict[str, Any] = json.loads(raw or b"{}")
    streams = data.get("streams", [])
    fmt = data.get("format", {})
    if not streams:
        raise InvalidInput(f"{field}: the file has no audio or video streams", field=field)
    duration = _float(fmt.get("duration"))
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    audio_duration = max((_float(s.get("duration")) for s in audio), default=0.0) or duration
    return MediaInfo(
        format_name=str(fmt.get("format_name", "")),
        duration_s=duration,
        audio_duration_s=audio_duration,
        has_audio=bool(audio),
        has_video=any(s.get("codec_type") == "video" for s in streams),
    )


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def check_audio(info: MediaInfo, *, max_duration_s: float, field: str) -> None:
    """The probed file has audio of a usable, permitted length."""
    if not info.has_audio:
        raise InvalidInput(f"{field}: the file has no audio stream", field=field)
    if info.audio_duration_s <= 0:
        raise InvalidInput(f"{field}: the audio has zero length", field=field)
    if info.audio_duration_s > max_duration_s:
        raise InputTooLarge(
            f"{field}: audio is {info.audio_duration_s:.0f}s long, the limit is {max_duration_s:.0f}s",
            field=field,
        )


def _decode_args(path: Path, *, limit_s: float) -> list[str]:
    graph = (
        ffmpeg.input(f"file:{path}", **LOCKDOWN)
        .output("pipe:", format="s16le", acodec="pcm_s16le", ac=1, ar=SAMPLE_RATE, t=f"{limit_s:.3f}")
        .global_args("-nostdin", "-threads", "0", "-v", "error")
    )
    args: list[str] = graph.compile()
    return args


def load_audio(
    path: Path, *, max_duration_s: float, timeout_s: float, field: str, cancel: CancelToken | None = None
) -> tuple[np.ndarray, MediaInfo]:
    """Probe and decode ``path`` to mono float32 PCM at 16 kHz, as Whisper expects.

    ffprobe and the decoder start together: each costs a process start (most of it loading
    ffmpeg's libraries; bench/RESULTS.md), which would otherwise be paid twice per job. The probe
    still decides: if it rejects the file, the decoder is killed and nothing it produced is
    used; the decoder is also capped at the duration limit, so it can never do unbounded
    work on a file the probe is about to refuse.
    """
    _check_file(path, field=field)
    decoder = media_tools.start(
        _decode_args(path, limit_s=max_duration_s + 1.0), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    with media_tools.watch(decoder, cancel):
        info = _ffprobe(path, timeout_s=timeout_s, field=field, cancel=cancel)
        check_audio(info, max_duration_s=max_duration_s, field=field)
        try:
            stdout, stderr = decoder.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise InvalidInput(f"{field}: decoding ran longer than {timeout_s:g}s", field=field) from exc
    if decoder.returncode != 0:
        raise InvalidInput(f"{field}: could not decode the audio ({media_tools.tail(stderr, field)})", field=field)
    return _samples(stdout, info, field=field), info


def _samples(pcm: bytes, info: MediaInfo, *, field: str) -> np.ndarray:
    audio = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768.0
    decoded_s = audio.size / SAMPLE_RATE
    if decoded_s < info.audio_duration_s * _MIN_DECODED_SHARE - 0.5:
        raise InvalidInput(
            f"{field}: the file is truncated or corrupt: {decoded_s:.1f}s of "
            f"{info.audio_duration_s:.1f}s could be decoded",
            field=field,
        )
    return audio
