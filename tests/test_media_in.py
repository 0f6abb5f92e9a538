"""Reading user media in, on real ffmpeg: probing, decoding, and the lock-down of what ffmpeg may open."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from handler.errors import InputTooLarge, InvalidInput
from handler.io import media_in
from testkit import media as samples


def child_processes() -> list[str]:
    """This process's ffmpeg/ffprobe children (servers that session fixtures started are not counted)."""
    pid = os.getpid()
    children: list[str] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += (task / "children").read_text().split()
    return [child for child in children if b"ff" in _program(child)]


def _program(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:  # ended meanwhile
        return b""


def test_decodes_what_whisper_would(speech_wav: Path) -> None:
    """load_audio gives the 16 kHz mono float samples openai-whisper's own loader gives."""
    import whisper

    audio, info = media_in.load_audio(speech_wav, max_duration_s=60, timeout_s=60, field="audio")
    assert np.array_equal(audio, whisper.load_audio(str(speech_wav)))
    assert info.has_audio and not info.has_video
    assert audio.size / media_in.SAMPLE_RATE == pytest.approx(info.audio_duration_s, abs=0.05)


def test_rejected_probe_stops_the_decoder(speech_wav: Path) -> None:
    """Audio over the limit is INPUT_TOO_LARGE, and the decoder started alongside the probe is gone."""
    with pytest.raises(InputTooLarge):
        media_in.load_audio(speech_wav, max_duration_s=1, timeout_s=60, field="audio")
    assert child_processes() == []


def test_playlist_never_reaches_ffmpeg(tmp_path: Path) -> None:
    """An HLS playlist pointing at a local file is refused before ffmpeg opens it."""
    playlist = tmp_path / "p.m3u8"
    playlist.write_text("#EXTM3U\n#EXTINF:10,\nfile:///etc/passwd\n")
    with pytest.raises(InvalidInput, match="playlists"):
        media_in.load_audio(playlist, max_duration_s=60, timeout_s=60, field="audio")


def test_demuxer_whitelist_holds_without_the_sniffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the sniffer switched off, ffprobe itself refuses the HLS demuxer (defence in depth)."""
    monkeypatch.setattr(media_in, "sniff_playlist", lambda path, *, field: None)
    playlist = tmp_path / "p.m3u8"
    playlist.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n")
    with pytest.raises(InvalidInput, match="whitelist"):
        media_in.probe(playlist, timeout_s=30, field="audio")


def test_audio_stream_duration_is_used_for_video(speech_wav: Path, tmp_path: Path) -> None:
    """A video longer than its audio track is judged by its audio."""
    import subprocess

    video = tmp_path / "v.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=c=black:s=32x32:r=5:d=20",
                    "-i", str(speech_wav), "-c:v", "libx264", "-c:a", "aac", str(video)], check=True)
    audio, info = media_in.load_audio(video, max_duration_s=60, timeout_s=60, field="audio")
    assert info.has_video
    assert info.duration_s > info.audio_duration_s + 5
    assert audio.size / media_in.SAMPLE_RATE == pytest.approx(info.audio_duration_s, abs=0.1)


def test_silence_decodes_to_zeros(tmp_path: Path) -> None:
    """Silence is valid media: it decodes, to near-zero samples."""
    audio, _ = media_in.load_audio(samples.silence(tmp_path / "s.wav", 2.0), max_duration_s=60, timeout_s=60,
                                field="audio")
    assert audio.size == 2 * media_in.SAMPLE_RATE
    assert float(np.abs(audio).max()) < 1e-3
