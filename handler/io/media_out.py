"""The worker's own audio and video written out: WAV files, speech re-encoded for OpenAI's formats,
generated frames streamed into an H.264 mp4, and the final mux with narration and captions.

What is encoded here is the worker's output, never user media, with one exception: a narration
the client sent is muxed in, and it is opened under the same lock-down as every user file
(:data:`handler.io.media_in.LOCKDOWN`). Every encoder has a deadline and is killed when its job
is cancelled.
"""

from __future__ import annotations

import contextlib
import functools
import re
import subprocess
import threading
import wave
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np

from handler.cancel import CancelToken
from handler.errors import InvalidInput, WorkerError
from handler.io import media_tools
from handler.io.media_in import LOCKDOWN


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
        code, stdout, _ = media_tools.run(["ffmpeg", "-hide_banner", "-encoders"], timeout_s=30,
                                          timeout_error=WorkerError("ffmpeg -encoders ran longer than 30s"))
    except WorkerError:
        return frozenset()
    return frozenset(_ENCODER_LINE.findall(stdout.decode("utf-8", "replace"))) if code == 0 else frozenset()


def encode_audio(wav: bytes, encoding: AudioEncoding, *, timeout_s: float) -> bytes:
    """A WAV file (the worker's own output, never user media) re-encoded by ffmpeg, in memory."""
    args = ["ffmpeg", "-v", "error", "-f", "wav", "-i", "pipe:0", "-vn", "-c:a", encoding.encoder,
            *encoding.options, "-f", encoding.muxer, "pipe:1"]
    code, stdout, stderr = media_tools.run(args, timeout_s=timeout_s, stdin=wav,
                                           timeout_error=WorkerError(f"audio encoding ran longer than {timeout_s:g}s"))
    if code != 0 or not stdout:
        raise WorkerError(f"audio encoding to {encoding.muxer} failed ({media_tools.tail(stderr, 'speech')})")
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
        self._process = media_tools.start(args, stdin=subprocess.PIPE, stderr=self._stderr)

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
        return media_tools.tail(self._stderr.read())

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
        for option, value in LOCKDOWN.items():
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
    code, _stdout, stderr = media_tools.run(
        args, timeout_s=timeout_s, timeout_error=WorkerError(f"muxing ran longer than {timeout_s:g}s"),
        cancel=cancel, cwd=workdir,
    )
    if code != 0:
        if audio is not None and b"Invalid data" in stderr:
            detail = media_tools.tail(stderr, audio_field)
            raise InvalidInput(f"{audio_field}: could not read the narration ({detail})", field=audio_field)
        raise WorkerError(f"muxing failed ({media_tools.tail(stderr)})")
