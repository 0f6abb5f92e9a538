"""ffprobe and ffmpeg on user media, locked down, with their failures turned into input errors.

User files are opened with ``-protocol_whitelist file`` and a demuxer whitelist of ordinary
audio/video containers, so a playlist, manifest or concat list can never make ffmpeg open a
URL or another local file. Commands are argument lists (ffmpeg-python builds the decode
graph), each run has a deadline, and stderr goes into the error message with every file path
replaced by the input's field name (a client never learns the worker's paths). A cancelled
job's ffmpeg children are killed at once. Nothing above this module knows ffmpeg's exit codes
or messages; subprocess's errors are translated in :func:`_run` and :func:`_watch`, nowhere else.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import subprocess
import threading
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ffmpeg
import numpy as np

from handler.cancel import CancelToken
from handler.errors import InputTooLarge, InvalidInput, WorkerError

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
_LOCKDOWN = {"protocol_whitelist": "file", "format_whitelist": DEMUXER_WHITELIST}
_PLAYLIST_MAGIC = (b"#EXTM3U", b"<?xml", b"<MPD", b"ffconcat", b"[playlist]")
SAMPLE_RATE = 16000
# Decoded audio shorter than this share of the declared duration means a cut-off file.
_MIN_DECODED_SHARE = 0.9
_STDERR_TAIL = 400
# An absolute path (optionally with ffmpeg's file: prefix) in a tool's message.
_PATH = re.compile(r"(?<![\w.])(?:file:)?(?:/[^\s:'\"/]+)+/?")


@dataclass(frozen=True)
class MediaInfo:
    """What ffprobe says about a file."""

    format_name: str
    # Container duration, and the longest audio stream's (the container's if not declared).
    duration_s: float
    audio_duration_s: float
    has_audio: bool
    has_video: bool


def _tail(stderr: bytes, name: str = "file") -> str:
    """The end of a tool's message, each path in it replaced by ``name``."""
    text = _PATH.sub(name, stderr.decode("utf-8", "replace")).strip()
    return text[-_STDERR_TAIL:] if text else "no details"


def _start(args: list[str], **options: Any) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(args, **options)
    except FileNotFoundError as exc:
        raise WorkerError(f"{args[0]} is not installed") from exc
    except OSError as exc:
        raise WorkerError(f"{args[0]} could not start ({type(exc).__name__})") from exc


@contextlib.contextmanager
def _watch(process: subprocess.Popen[bytes], cancel: CancelToken | None) -> Iterator[None]:
    """Kill ``process`` if the job is cancelled (or the block fails); raise Cancelled after."""
    token = cancel or CancelToken()
    try:
        with token.on_cancel(process.kill):
            yield
    finally:
        if process.poll() is None:
            process.kill()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        process.wait()
    token.check()


def _run(
    args: list[str], *, timeout_s: float, timeout_error: WorkerError, cancel: CancelToken | None = None,
    cwd: Path | None = None, stdin: bytes | None = None,
) -> tuple[int, bytes, bytes]:
    """Run a tool to its end (``stdin`` fed to it): (exit code, stdout, stderr); past ``timeout_s``,
    ``timeout_error``."""
    process = _start(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                     stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
    with _watch(process, cancel):
        try:
            stdout, stderr = process.communicate(stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise timeout_error from exc
    if cancel is not None:
        cancel.check()
    return process.returncode, stdout, stderr


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
    for option, value in _LOCKDOWN.items():
        args += [f"-{option}", value]
    code, stdout, stderr = _run(
        [*args, f"file:{path}"], timeout_s=timeout_s, timeout_error=_too_slow(field, timeout_s), cancel=cancel
    )
    if code != 0:
        raise InvalidInput(f"{field}: not a readable media file ({_tail(stderr, field)})", field=field)
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
        ffmpeg.input(f"file:{path}", **_LOCKDOWN)
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
    decoder = _start(
        _decode_args(path, limit_s=max_duration_s + 1.0), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    with _watch(decoder, cancel):
        info = _ffprobe(path, timeout_s=timeout_s, field=field, cancel=cancel)
        check_audio(info, max_duration_s=max_duration_s, field=field)
        try:
            stdout, stderr = decoder.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise InvalidInput(f"{field}: decoding ran longer than {timeout_s:g}s", field=field) from exc
    if decoder.returncode != 0:
        raise InvalidInput(f"{field}: could not decode the audio ({_tail(stderr, field)})", field=field)
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


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """Mono float samples in [-1, 1] as a 16-bit PCM WAV file."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())


@dataclass(frozen=True)
class AudioEncoding:
    """How ffmpeg writes one of OpenAI's speech ``response_format`` values."""

    muxer: str
    encoder: str
    options: tuple[str, ...]
    media_type: str


# OpenAI's speech formats but wav (written by the worker itself). opus is Ogg Opus at 48 kHz
# (libopus takes few rates); pcm is OpenAI's raw 24 kHz 16-bit little-endian mono.
AUDIO_ENCODINGS = {
    "mp3": AudioEncoding("mp3", "libmp3lame", ("-b:a", "64k"), "audio/mpeg"),
    "opus": AudioEncoding("ogg", "libopus", ("-b:a", "32k", "-ar", "48000"), "audio/ogg"),
    "aac": AudioEncoding("adts", "aac", ("-b:a", "64k"), "audio/aac"),
    "flac": AudioEncoding("flac", "flac", (), "audio/flac"),
    "pcm": AudioEncoding("s16le", "pcm_s16le", ("-ar", "24000", "-ac", "1"), "audio/pcm"),
}
_ENCODER_LINE = re.compile(r"^\s*A\S*\s+(\S+)", re.MULTILINE)


@functools.cache
def audio_encoders() -> frozenset[str]:
    """The audio encoders this machine's ffmpeg has (asked once); empty without ffmpeg."""
    try:
        code, stdout, _ = _run(["ffmpeg", "-hide_banner", "-encoders"], timeout_s=30,
                               timeout_error=WorkerError("ffmpeg -encoders ran longer than 30s"))
    except WorkerError:
        return frozenset()
    return frozenset(_ENCODER_LINE.findall(stdout.decode("utf-8", "replace"))) if code == 0 else frozenset()


def encode_audio(wav: bytes, encoding: AudioEncoding, *, timeout_s: float) -> bytes:
    """A WAV file (the worker's own output, never user media) re-encoded by ffmpeg, in memory."""
    args = ["ffmpeg", "-v", "error", "-f", "wav", "-i", "pipe:0", "-vn", "-c:a", encoding.encoder,
            *encoding.options, "-f", encoding.muxer, "pipe:1"]
    code, stdout, stderr = _run(args, timeout_s=timeout_s, stdin=wav,
                                timeout_error=WorkerError(f"audio encoding ran longer than {timeout_s:g}s"))
    if code != 0 or not stdout:
        raise WorkerError(f"audio encoding to {encoding.muxer} failed ({_tail(stderr, 'speech')})")
    return stdout


class FrameWriter:
    """Encode RGB frames, streamed in as they are generated, to an H.264 mp4 (no audio).

    ``hold`` repeats the last frame that many times at the end (a short tail is held rather
    than generated). Every write has a deadline: an encoder that stops reading is killed, so
    it can never hold a GPU slot; a cancelled job's encoder is killed too.
    """

    def __init__(
        self, path: Path, *, width: int, height: int, fps: int, hold: int = 0, timeout_s: float,
        cancel: CancelToken | None = None,
    ) -> None:
        self.path = path
        self.frames = 0
        self._timeout_s = timeout_s
        self._cancel = cancel or CancelToken()
        self._stderr = path.with_suffix(".log").open("w+b")
        output = {"vcodec": "libx264", "pix_fmt": "yuv420p", "preset": "veryfast", "crf": 18, "r": fps}
        if hold:
            output["vf"] = f"tpad=stop_mode=clone:stop={hold}"
        args: list[str] = (
            ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", r=fps)
            .output(str(path), **output)
            .global_args("-v", "error", "-y")
            .compile()
        )
        self._process = _start(args, stdin=subprocess.PIPE, stderr=self._stderr)

    def write(self, frames: np.ndarray) -> None:
        """``frames``: uint8 array of shape (count, height, width, 3)."""
        assert self._process.stdin is not None
        data = np.ascontiguousarray(frames, dtype=np.uint8).tobytes()
        stopped_stalled = threading.Event()

        def stop_stalled() -> None:
            stopped_stalled.set()
            self._process.kill()

        stalled = threading.Timer(self._timeout_s, stop_stalled)
        stalled.start()
        try:
            with self._cancel.on_cancel(self._process.kill):
                self._process.stdin.write(data)
                self._process.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            self._cancel.check()
            raise WorkerError(f"video encoding stopped ({self._detail(stopped_stalled.is_set())})") from exc
        finally:
            stalled.cancel()
        self.frames += len(frames)

    def _detail(self, stopped_stalled: bool = False) -> str:
        # Known from the deadline, not the process: a killed encoder may not have been reaped yet.
        if stopped_stalled or (self._process.poll() is not None and self._process.returncode < 0):
            return f"encoder stalled for {self._timeout_s:g}s and was stopped"
        if self._process.poll() is None:
            return "still running"
        self._stderr.seek(0)
        return _tail(self._stderr.read())

    def close(self) -> None:
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.close()
        try:
            with self._cancel.on_cancel(self._process.kill):
                code = self._process.wait(timeout=self._timeout_s)
        except subprocess.TimeoutExpired:
            self.abort()
            raise WorkerError(f"video encoding ran longer than {self._timeout_s:g}s") from None
        self._cancel.check()
        detail = self._detail()
        self._stderr.close()
        if code != 0:
            raise WorkerError(f"video encoding failed ({detail})")

    def abort(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self._process.stdin.close()
        self._stderr.close()


def finish_video(
    video: Path, target: Path, *, audio: Path | None, subtitles: Path | None, burn: bool, font_size: int,
    duration_s: float, timeout_s: float, cancel: CancelToken | None = None, audio_field: str = "audio",
) -> None:
    """Mux ``video`` with narration (AAC, padded with silence to the video's end) and captions.

    Soft captions become an mp4 text stream; burned ones are drawn by libass. The output
    starts playing before it has fully downloaded (``+faststart``). ``audio`` may come from
    the user, so it is opened under the same lock-down as every user file. Paths are passed
    relative to the job directory, so no file name needs escaping inside a filter.
    """
    workdir = video.parent
    args = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", video.name]
    if audio is not None:
        for option, value in _LOCKDOWN.items():
            args += [f"-{option}", value]
        args += ["-i", f"file:{audio.name}"]
    if subtitles is not None and not burn:
        args += ["-i", subtitles.name]
    args += ["-map", "0:v:0"]
    if audio is not None:
        # Padded with silence and cut at the video's end (not -shortest: a subtitle stream
        # that ends early would cut the video and the speech with it).
        args += ["-map", "1:a:0", "-c:a", "aac", "-b:a", "128k", "-af", "apad"]
    if subtitles is not None and burn:
        style = f"FontSize={font_size},Outline=2,Shadow=0,MarginV=20,Alignment=2"
        args += ["-vf", f"subtitles={subtitles.name}:force_style='{style}'",
                 "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast", "-crf", "18"]
    else:
        args += ["-c:v", "copy"]
    if subtitles is not None and not burn:
        args += ["-map", f"{2 if audio is not None else 1}:s:0", "-c:s", "mov_text", "-metadata:s:s:0",
                 "language=eng"]
    args += ["-t", f"{duration_s:.3f}", "-movflags", "+faststart", target.name]
    code, _stdout, stderr = _run(
        args, timeout_s=timeout_s, timeout_error=WorkerError(f"muxing ran longer than {timeout_s:g}s"),
        cancel=cancel, cwd=workdir,
    )
    if code != 0:
        if audio is not None and b"Invalid data" in stderr:
            raise InvalidInput(f"{audio_field}: could not read the narration ({_tail(stderr, audio_field)})",
                               field=audio_field)
        raise WorkerError(f"muxing failed ({_tail(stderr)})")
