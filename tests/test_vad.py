"""Chunking for batched transcription: Silero VAD on real espeak-ng speech, and fixed windows."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper

from handler.cancel import CancelToken
from handler.pipelines.whisper import vad
from handler.pipelines.whisper.vad import Chunk
from testkit import clips, media, speech_corpus

_ROOT = Path(__file__).resolve().parents[1]
# Louder than any sample of a pause, quieter than the peaks of every spoken word.
_LOUD = 0.05
# RMS over the 100 ms around a cut below which it sits in a pause, not in a word (espeak's pauses
# are digital silence; 4% of random points inside its speech pass too, so it takes every cut).
_PAUSE_RMS = 0.005
# No punctuation, so espeak-ng makes no pause long enough to end a VAD region (300 ms): one
# region of ~53 s that only Silero's own max_speech_duration_s can split, in a short pause
# between words (a naive cut at a half or a third of it lands inside a word).
_LONG_TEXT = " ".join(
    [
        "please send the report by friday morning and the quick brown fox jumps over the lazy dog while we "
        "meet again next week to review the numbers because the weather is nice today so let us go outside "
        "and seven hundred people came"
    ]
    * 3
)


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """About 53 s of espeak-ng speech with no pause longer than between two words."""
    directory = tmp_path_factory.mktemp("vad-long")
    audio: np.ndarray = whisper.load_audio(str(media.speak(_LONG_TEXT, directory / "long.wav")))
    assert len(audio) > 45 * clips.SAMPLE_RATE
    return audio


@pytest.fixture(scope="module")
def speech_corpus_recording() -> np.ndarray:
    """Three minutes of real speech: the corpus's LibriVox and MFA clips joined with short pauses."""
    cache = speech_corpus.default_cache()
    utterances = speech_corpus.librivox(cache) + speech_corpus.mfa(cache)
    return speech_corpus.long_form(utterances, seed=0, target_s=180.0).audio


def _cuts(chunks: list[Chunk]) -> list[int]:
    return [edge for chunk in chunks for edge in (chunk.start, chunk.end)]


def _uncovered_speech(audio: np.ndarray, chunks: list[Chunk]) -> int:
    covered = np.zeros(len(audio), dtype=bool)
    for chunk in chunks:
        covered[chunk.start : chunk.end] = True
    return int(np.count_nonzero((np.abs(audio) > _LOUD) & ~covered))


@pytest.mark.parametrize("max_chunk_s", [6.0, 12.0, 30.0])
def test_chunks_are_cut_inside_the_pauses(gapped_clip: clips.Clip, max_chunk_s: float) -> None:
    """Every chunk edge is in silence, every cut between chunks lies in one of the gaps, no speech is left out."""
    chunks = vad.speech_chunks(gapped_clip.audio, max_chunk_s=max_chunk_s)
    assert chunks, "speech must give chunks"
    assert all(0 < chunk.duration_s <= max_chunk_s for chunk in chunks)
    assert all(a.end <= b.start for a, b in itertools.pairwise(chunks)), "chunks overlap or are unordered"
    assert all(clips.rms(gapped_clip.audio, edge, 800) < _PAUSE_RMS for edge in _cuts(chunks)), _cuts(chunks)
    for before, after in itertools.pairwise(chunks):
        gaps = gapped_clip.gaps
        assert any(lo <= before.end <= after.start <= hi for lo, hi in gaps), (before, after, gaps)
    assert _uncovered_speech(gapped_clip.audio, chunks) == 0


def test_sentences_merge_up_to_the_limit(gapped_clip: clips.Clip) -> None:
    """With 6 s chunks each sentence is its own chunk; with 30 s the whole 22 s clip is one."""
    assert len(vad.speech_chunks(gapped_clip.audio, max_chunk_s=6.0)) == len(clips.SENTENCES)
    assert len(vad.speech_chunks(gapped_clip.audio, max_chunk_s=30.0)) == 1


def test_long_speech_is_split_into_windows_of_at_most_30_s(long_speech: np.ndarray) -> None:
    """53 s of speech with no long pause still comes out as chunks of at most 30 s, cut in short pauses."""
    assert len(vad.speech_regions(long_speech, max_region_s=1e9)) == 1, "the clip must be one VAD region"
    chunks = vad.speech_chunks(long_speech)
    assert len(chunks) >= 2
    assert all(chunk.duration_s <= 30.0 for chunk in chunks)
    inner_cuts = _cuts(chunks)[1:-1]
    assert all(clips.rms(long_speech, edge, 800) < _PAUSE_RMS for edge in inner_cuts), inner_cuts
    assert _uncovered_speech(long_speech, chunks) == 0


def test_silence_gives_no_chunks() -> None:
    """Digital silence and faint hiss contain no speech: no chunks, so nothing is decoded."""
    assert vad.speech_chunks(np.zeros(10 * clips.SAMPLE_RATE, dtype=np.float32)) == []
    hiss = np.random.default_rng(0).normal(0, 1e-3, 10 * clips.SAMPLE_RATE).astype(np.float32)
    assert vad.speech_chunks(hiss) == []


def test_concurrent_callers_get_the_same_chunks(gapped_clip: clips.Clip, long_speech: np.ndarray) -> None:
    """Four threads at once each get what they get alone, each pass on one torch thread, and each
    thread's torch thread count is as before after its pass.

    Torch's thread count is a setting of each thread: a pass that set it for the process only would
    leave the others' passes on two threads. A pass that kept its recurrent state in the shared model
    (as Silero's own wrapper does) would mix the threads' windows, and the chunks would change.
    """
    gapped = gapped_clip.audio
    inputs = [(gapped, 6.0), (long_speech, 30.0), (long_speech[::-1].copy(), 30.0), (gapped, 12.0)]
    alone = [vad.speech_chunks(audio, max_chunk_s=limit) for audio, limit in inputs]
    together: list[list[Chunk] | None] = [None] * len(inputs)
    during: list[set[int]] = [set() for _ in inputs]
    after: list[int] = [0] * len(inputs)

    class Watch(CancelToken):  # the pass reports each block here: the pass's thread count then
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

        def check(self) -> None:
            during[self.index].add(torch.get_num_threads())

    def run(index: int) -> None:
        torch.set_num_threads(2)
        audio, limit = inputs[index]
        together[index] = vad.speech_chunks(audio, max_chunk_s=limit, cancel=Watch(index))
        after[index] = torch.get_num_threads()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert together == alone
    assert during == [{1}] * len(inputs)
    assert after == [2] * len(inputs)


def test_the_batched_pass_is_silero_own_loop(speech_corpus_recording: np.ndarray) -> None:
    """On minutes of real speech, the pass over the whole recording at once gives Silero's own
    window-by-window probabilities (its wrapper's ``__call__`` with its recurrent state), within float
    rounding, and the very same chunks and regions."""
    audio = speech_corpus_recording
    silero = vad._load_model()
    silero.reset_states()
    samples = torch.from_numpy(audio)
    with torch.no_grad():
        own = [silero(torch.nn.functional.pad(samples[start:start + 512], (0, max(0, start + 512 - len(samples)))),
                      16000).item() for start in range(0, len(samples), 512)]
    batched = vad.speech_probabilities(audio)
    assert len(batched) == len(own) > 5000
    assert np.abs(np.array(batched) - np.array(own)).max() < 1e-4
    assert vad.speech_chunks(audio, probabilities=batched) == vad.speech_chunks(audio, probabilities=own)
    sensitive = {"threshold": 0.2, "min_silence_ms": 100, "speech_pad_ms": 30}
    assert (vad.speech_regions(audio, probabilities=batched, **sensitive)
            == vad.speech_regions(audio, probabilities=own, **sensitive))


def test_fixed_windows_tile_the_audio_and_cut_in_a_pause_near_the_limit(gapped_clip: clips.Clip) -> None:
    """Without VAD the chunks cover every sample once, none over the limit, each cut at the quietest point nearby."""
    chunks = vad.fixed_chunks(gapped_clip.audio, max_chunk_s=5.0, search_s=2.0)
    assert chunks[0].start == 0 and chunks[-1].end == len(gapped_clip.audio)
    assert all(a.end == b.start for a, b in itertools.pairwise(chunks))
    assert all(chunk.duration_s <= 5.0 for chunk in chunks)
    first_gap = gapped_clip.gaps[0]
    assert first_gap[0] <= chunks[0].end <= first_gap[1], "the first cut must fall in the pause before 5 s"


def test_fixed_windows_of_short_audio_and_bad_limits() -> None:
    """Audio shorter than a window is one chunk, empty audio none; a window over 30 s is refused by name."""
    assert vad.fixed_chunks(np.zeros(1000, dtype=np.float32)) == [Chunk(0, 1000)]
    assert vad.fixed_chunks(np.zeros(0, dtype=np.float32)) == []
    with pytest.raises(ValueError, match="max_chunk_s"):
        vad.speech_chunks(np.zeros(1000, dtype=np.float32), max_chunk_s=31.0)
    with pytest.raises(ValueError, match="max_chunk_s"):
        vad.fixed_chunks(np.zeros(1000, dtype=np.float32), max_chunk_s=0.5)


def test_merge_splits_an_overlong_region_hard() -> None:
    """A region over the limit (Silero never gives one; this is the guard) is cut into equal parts within it."""
    merged = vad.merge_regions([Chunk(0, 70_000), Chunk(75_000, 80_000)], max_samples=32_000)
    assert merged == [Chunk(0, 23_333), Chunk(23_333, 46_667), Chunk(46_667, 70_000), Chunk(75_000, 80_000)]


def test_chunk_times_are_in_seconds() -> None:
    """Chunk edges in samples convert to seconds at 16 kHz."""
    chunk = Chunk(16_000, 40_000)
    assert (chunk.start_s, chunk.end_s, chunk.duration_s) == (1.0, 2.5, 1.5)


def test_loading_the_vad_leaves_torch_threads_alone() -> None:
    """silero_vad's import sets the importing thread (and threads started later) to one torch thread; the
    worker's other models must keep theirs.

    Run in a fresh interpreter, where silero_vad is not imported yet.
    """
    code = (
        "import numpy, torch\n"
        "torch.set_num_threads(2)\n"
        "from handler.pipelines.whisper import vad\n"
        "vad.speech_chunks(numpy.zeros(16000, dtype=numpy.float32))\n"
        "print(torch.get_num_threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "2"


def test_a_cancelled_job_stops_its_vad_pass() -> None:
    """The VAD pass of a cancelled job stops at its next window (CANCELLED), not after the whole recording."""
    import time

    from handler.cancel import CancelToken
    from handler.errors import Cancelled
    from handler.pipelines.whisper.vad import speech_chunks

    token = CancelToken()
    token.cancel()
    noise = np.random.default_rng(1).normal(0, 0.1, 16000 * 600).astype(np.float32)  # ten minutes
    started = time.monotonic()
    with pytest.raises(Cancelled):
        speech_chunks(noise, cancel=token)
    assert time.monotonic() - started < 2


def test_one_pass_read_two_ways_gives_the_regions_of_two_passes(gapped_clip: clips.Clip) -> None:
    """A pass of probabilities made once (as a diarized job shares it) gives exactly the chunks and the
    regions that separate passes give, for the decoding's settings and for diarization's."""
    probabilities = vad.speech_probabilities(gapped_clip.audio)
    assert len(probabilities) == -(-len(gapped_clip.audio) // 512)
    assert vad.speech_chunks(gapped_clip.audio, probabilities=probabilities) == vad.speech_chunks(gapped_clip.audio)
    sensitive = {"threshold": 0.2, "min_silence_ms": 100, "speech_pad_ms": 30}
    assert vad.speech_regions(gapped_clip.audio, probabilities=probabilities, **sensitive) == vad.speech_regions(
        gapped_clip.audio, **sensitive)
