"""Who spoke when: voice embeddings of short windows of speech, clustered into speakers.

1. Speech regions come in from the caller (Silero VAD, cut at pauses of ~100 ms, so that most
   changes of speaker fall between regions).
2. Each region is embedded by the GE2E encoder (:mod:`.encoder`) in windows of 1.6 s every 0.8 s
   (a shorter region: one window of all of it).
3. The windows are clustered: agglomerative, cosine distance, average linkage, cut at a distance
   threshold unless the number of speakers is given or bounded; then a few rounds of assigning each
   window to its nearest speaker centroid, and speakers with under ``_MIN_SPEAKER_S`` of speech
   folded into their nearest neighbour (a cough or a laugh is not a speaker).
4. A region whose windows agree is one turn; one where a run of windows differs is cut at the
   midpoint between the windows where the speaker changes.
5. Speakers are named by the reference voices given (the assignment of most total similarity, each
   above a floor), the rest ``A``, ``B``, ... in order of first speech. Known voices are taken to be
   present: at least as many speakers are found as there are known voices.

Runs on the CPU or the GPU; the encoder is 1.4 M parameters, a few seconds of CPU for an hour of speech.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from handler.cancel import CancelToken
from handler.config import Settings
from handler.pipelines.diarize import encoder as enc
from handler.pipelines.weights import diarization_weights, file_identity
from handler.runtime.container import Runtime
from handler.runtime.instances import InstancePool, Placement, move_whole
from handler.runtime.memory import module_bytes
from handler.runtime.registry import PipelineKey

SAMPLE_RATE = enc.SAMPLE_RATE
# Windows of the length the encoder was trained on, half overlapping.
_WINDOW = enc.PARTIAL_FRAMES
_STEP = enc.PARTIAL_FRAMES // 2
# A region shorter than this is not embedded on its own: it takes its nearest neighbour's speaker.
_MIN_REGION_FRAMES = 40
# Two windows closer than this (cosine distance of their embeddings) may be one voice.
_DISTANCE_THRESHOLD = 0.42
# A speaker needs this much speech to be one; less is folded into the nearest speaker.
_MIN_SPEAKER_S = 8.0
# A reference voice names a speaker whose centroid is at least this similar to it.
_KNOWN_SIMILARITY = 0.70
_BATCH = 256
MAX_SPEAKERS = 20


@dataclass(frozen=True)
class Span:
    """A stretch ``[start, end)`` of the recording in samples at 16 kHz."""

    start: int
    end: int


@dataclass(frozen=True)
class Turn:
    """One speaker's stretch of speech, in seconds."""

    start: float
    end: float
    speaker: str


@dataclass(frozen=True)
class SpeakerBounds:
    """How many speakers to find: exactly ``num``, or between ``low`` and ``high``."""

    num: int | None = None
    low: int = 1
    high: int = MAX_SPEAKERS


@dataclass(frozen=True)
class _Window:
    region: int
    start: int  # frames from the region's start
    end: int


@dataclass(frozen=True)
class Embedded:
    """A recording's speech as the encoder saw it: the windows of its regions and one embedding each.
    Clustering it again with other bounds or voices costs no encoder time."""

    regions: list[Span]
    windows: list[_Window]
    embeddings: np.ndarray


@dataclass
class DiarizationPipeline:
    """The voice encoder, on its device; stateless between calls, so instances are shared safely."""

    encoder: enc.VoiceEncoder
    name: str
    device: str

    def to(self, device: str) -> None:
        """Move the weights (the residency parks an idle encoder in host RAM and brings it back)."""
        self.encoder.to(device)

    def voice(self, audio: np.ndarray, regions: list[Span]) -> np.ndarray:
        """One L2-normed embedding of the voice speaking in ``regions`` of ``audio`` (a reference clip)."""
        gain = enc.level_gain(_speech(audio, regions))
        windows, mels = self._windows(audio, regions, gain)
        if not windows:
            raise ValueError("no speech to embed")
        embeddings = self._embed(mels)
        mean = embeddings.mean(axis=0)
        return np.asarray(mean / np.linalg.norm(mean), dtype=np.float32)

    def diarize(
        self, audio: np.ndarray, regions: list[Span], *, bounds: SpeakerBounds = SpeakerBounds(),
        known: dict[str, np.ndarray] | None = None, cancel: CancelToken | None = None,
    ) -> list[Turn]:
        """The speaker turns of ``audio`` over its speech ``regions`` (in time order)."""
        return self.speakers(self.embed(audio, regions, cancel=cancel), bounds=bounds, known=known)

    def embed(self, audio: np.ndarray, regions: list[Span], *, cancel: CancelToken | None = None) -> Embedded:
        """The windows of ``audio``'s speech ``regions`` and their voice embeddings (the encoder's work)."""
        if not regions:
            return Embedded(regions, [], np.zeros((0, enc.EMBEDDING_SIZE), np.float32))
        gain = enc.level_gain(_speech(audio, regions))
        windows, mels = self._windows(audio, regions, gain)
        if cancel is not None:
            cancel.check()
        return Embedded(regions, windows, self._embed(mels, cancel=cancel))

    def speakers(self, embedded: Embedded, *, bounds: SpeakerBounds = SpeakerBounds(),
                 known: dict[str, np.ndarray] | None = None) -> list[Turn]:
        """The speaker turns of embedded speech: its windows clustered within ``bounds``, named by
        the ``known`` voices where they match."""
        regions, windows, embeddings = embedded.regions, embedded.windows, embedded.embeddings
        if not regions:
            return []
        if not windows:  # only crumbs of speech: one speaker for all of it
            return _name([(span.start, span.end, 0) for span in regions], np.zeros((1, 1)), known or {})
        if known and bounds.num is None:  # the known voices are taken to be speaking
            bounds = SpeakerBounds(low=min(max(bounds.low, len(known)), bounds.high), high=bounds.high)
        labels = cluster(embeddings, [w.end - w.start for w in windows], bounds)
        centroids = _centroids(embeddings, labels)
        pieces = _turn_pieces(regions, windows, labels)
        return _name(pieces, centroids, known or {})

    def _windows(self, audio: np.ndarray, regions: list[Span], gain: float) -> tuple[list[_Window], list[torch.Tensor]]:
        windows: list[_Window] = []
        mels: list[torch.Tensor] = []
        for index, span in enumerate(regions):
            frames = enc.mel_frames(audio[span.start:span.end] * gain)
            count = min(frames.shape[0], (span.end - span.start) // enc.HOP)
            if count < _MIN_REGION_FRAMES:
                continue
            for start in _window_starts(count):
                end = min(start + _WINDOW, count)
                windows.append(_Window(index, start, end))
                mels.append(frames[start:end])
        return windows, mels

    @torch.inference_mode()
    def _embed(self, mels: list[torch.Tensor], *, cancel: CancelToken | None = None) -> np.ndarray:
        """Embeddings of windows, batched by length (full windows together, each shorter one alone)."""
        out = np.zeros((len(mels), enc.EMBEDDING_SIZE), dtype=np.float32)
        by_length: dict[int, list[int]] = {}
        for index, mel in enumerate(mels):
            by_length.setdefault(mel.shape[0], []).append(index)
        for indices in by_length.values():
            for first in range(0, len(indices), _BATCH):
                if cancel is not None:
                    cancel.check()
                batch = indices[first:first + _BATCH]
                stacked = torch.stack([mels[i] for i in batch]).to(self.device)
                out[batch] = self.encoder(stacked).float().cpu().numpy()
        return out


def _speech(audio: np.ndarray, regions: list[Span]) -> np.ndarray:
    return np.concatenate([audio[s.start:s.end] for s in regions]) if regions else audio[:0]


def _window_starts(count: int) -> list[int]:
    """Window starts covering ``count`` frames: every ``_STEP``, the last one ending at the end."""
    if count <= _WINDOW:
        return [0]
    starts = list(range(0, count - _WINDOW + 1, _STEP))
    if starts[-1] + _WINDOW < count:
        starts.append(count - _WINDOW)
    return starts


def cluster(embeddings: np.ndarray, weights: list[int], bounds: SpeakerBounds) -> np.ndarray:
    """A speaker index per embedding (0..k-1), within ``bounds``."""
    from sklearn.cluster import AgglomerativeClustering

    count = len(embeddings)
    if count == 1 or bounds.num == 1 or bounds.high == 1:
        return np.zeros(count, dtype=np.int64)
    if bounds.num is not None:
        wanted: int | None = min(bounds.num, count)
    else:
        wanted = None
    model = AgglomerativeClustering(
        n_clusters=wanted, metric="cosine", linkage="average",
        distance_threshold=None if wanted is not None else _DISTANCE_THRESHOLD,
    )
    labels = model.fit_predict(embeddings)
    if wanted is None:
        found = len(set(labels.tolist()))
        clamped = min(max(found, bounds.low), bounds.high, count)
        if clamped != found:
            labels = AgglomerativeClustering(n_clusters=clamped, metric="cosine",
                                             linkage="average").fit_predict(embeddings)
    labels = _refine(embeddings, labels)
    if bounds.num is None:
        labels = _fold_small(embeddings, labels, np.asarray(weights), low=bounds.low)
    return _dense(labels)


def _centroids(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    centroids = np.stack([embeddings[labels == k].mean(axis=0) for k in range(int(labels.max()) + 1)])
    return np.asarray(centroids / np.linalg.norm(centroids, axis=1, keepdims=True))


def _refine(embeddings: np.ndarray, labels: np.ndarray, *, rounds: int = 5) -> np.ndarray:
    """Each window moved to its nearest centroid, a few times (average linkage leaves strays)."""
    labels = _dense(labels)
    for _ in range(rounds):
        moved = _dense(np.argmax(embeddings @ _centroids(embeddings, labels).T, axis=1))
        if len(set(moved.tolist())) != len(set(labels.tolist())) or np.array_equal(moved, labels):
            break
        labels = moved
    return labels


def _fold_small(embeddings: np.ndarray, labels: np.ndarray, frames: np.ndarray, *, low: int) -> np.ndarray:
    """Speakers with under ``_MIN_SPEAKER_S`` of windows folded into the nearest other, smallest first."""
    labels = labels.copy()
    while len(set(labels.tolist())) > max(low, 1):
        speakers = sorted(set(labels.tolist()))
        seconds = {k: frames[labels == k].sum() * enc.HOP / SAMPLE_RATE / 2 for k in speakers}
        smallest = min(speakers, key=lambda k: seconds[k])
        if seconds[smallest] >= _MIN_SPEAKER_S:
            break
        centroids = _centroids(embeddings, _dense(labels))
        order = {k: i for i, k in enumerate(sorted(speakers))}
        similarity = centroids @ centroids[order[smallest]]
        similarity[order[smallest]] = -2.0
        labels[labels == smallest] = speakers[int(np.argmax(similarity))]
    return labels


def _dense(labels: np.ndarray) -> np.ndarray:
    _, dense = np.unique(labels, return_inverse=True)
    return np.asarray(dense, dtype=np.int64)


def _turn_pieces(regions: list[Span], windows: list[_Window], labels: np.ndarray) -> list[tuple[int, int, int]]:
    """``(start, end, speaker)`` in samples: each region with its windows' speakers, cut where they change."""
    by_region: dict[int, list[tuple[_Window, int]]] = {}
    for window, label in zip(windows, labels.tolist(), strict=True):
        by_region.setdefault(window.region, []).append((window, label))
    pieces: list[tuple[int, int, int]] = []
    for index, span in enumerate(regions):
        found = by_region.get(index)
        if not found:
            continue
        smoothed = _smooth([label for _, label in found])
        cut_start = span.start
        for position in range(1, len(found)):
            if smoothed[position] != smoothed[position - 1]:
                before, after = found[position - 1][0], found[position][0]
                middle = ((before.start + before.end) // 2 + (after.start + after.end) // 2) // 2
                cut = span.start + middle * enc.HOP
                pieces.append((cut_start, cut, smoothed[position - 1]))
                cut_start = cut
        pieces.append((cut_start, span.end, smoothed[-1]))
    return _fill_crumbs(regions, pieces)


def _smooth(labels: list[int]) -> list[int]:
    """A lone window whose neighbours agree with each other takes their speaker."""
    out = list(labels)
    for i in range(1, len(labels) - 1):
        if labels[i - 1] == labels[i + 1] != labels[i]:
            out[i] = labels[i - 1]
    return out


def _fill_crumbs(regions: list[Span], pieces: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Regions too short to embed take the speaker of the nearest piece in time."""
    if not pieces:
        return pieces
    covered = {(p[0], p[1]) for p in pieces}
    starts = np.array([(p[0] + p[1]) / 2 for p in pieces])
    filled = list(pieces)
    for span in regions:
        inside = any(start >= span.start and end <= span.end for start, end in covered)
        if not inside:
            nearest = int(np.argmin(np.abs(starts - (span.start + span.end) / 2)))
            filled.append((span.start, span.end, pieces[nearest][2]))
    return sorted(filled)


def _letters() -> list[str]:
    letters = list(string.ascii_uppercase)
    return letters + [a + b for a in letters for b in letters]


def _name(pieces: list[tuple[int, int, int]], centroids: np.ndarray, known: dict[str, np.ndarray]) -> list[Turn]:
    """Turns with speaker names: known voices by their best-matching speaker, the rest lettered by first speech."""
    names: dict[int, str] = {}
    if known and centroids.shape[1] == enc.EMBEDDING_SIZE:
        from scipy.optimize import linear_sum_assignment

        references = list(known)
        similarity = centroids @ np.stack([known[name] for name in references]).T
        rows, cols = linear_sum_assignment(-similarity)
        for row, col in zip(rows.tolist(), cols.tolist(), strict=True):
            if similarity[row, col] >= _KNOWN_SIMILARITY:
                names[row] = references[col]
    letters = iter(letter for letter in _letters() if letter not in set(names.values()))
    for _, _, speaker in sorted(pieces):
        if speaker not in names:
            names[speaker] = next(letters)
    turns = [Turn(start / SAMPLE_RATE, end / SAMPLE_RATE, names[speaker]) for start, end, speaker in pieces]
    return _merge(turns)


def _merge(turns: list[Turn]) -> list[Turn]:
    """Touching turns of one speaker as one."""
    merged: list[Turn] = []
    for turn in turns:
        if merged and merged[-1].speaker == turn.speaker and turn.start - merged[-1].end < 1e-6:
            merged[-1] = Turn(merged[-1].start, turn.end, turn.speaker)
        else:
            merged.append(turn)
    return merged


def load_diarization(weights: Path, device: str, *, name: str) -> DiarizationPipeline:
    """The encoder in host RAM, computing on ``device`` once placed there."""
    if not weights.is_file():
        raise FileNotFoundError(f"no voice encoder weights at {weights} (DIARIZATION_MODEL); bake Resemblyzer "
                                "0.1.4's pretrained.pt there")
    return DiarizationPipeline(enc.load_encoder(weights, "cpu"), name, device)


def diarization_identity(name: str, settings: Settings) -> str | None:
    """The encoder's weights (for the result cache): the checkpoint's hash; None when it is not here."""
    path = diarization_weights(name, settings.model_dir)
    return file_identity(path) if path.is_file() else None


def get_pipelines(runtime: Runtime, name: str) -> InstancePool[DiarizationPipeline]:
    """The voice encoder ``name`` (fp32), loaded on first use; one instance serves every job (it
    keeps no state), MODEL_INSTANCES of them so that as many jobs embed at once."""
    key = PipelineKey("diarize", name, runtime.device, "float32")
    count = runtime.settings.model_instances
    weights = diarization_weights(name, runtime.settings.model_dir)
    # Built in host RAM: the residency places it on the device when a job holds it.
    return runtime.registry.get(key, lambda: InstancePool.build(
        count, lambda: load_diarization(weights, runtime.device, name=name), _placement))


def _placement(pipeline: DiarizationPipeline) -> Placement:
    return Placement(weights=module_bytes(pipeline.encoder), move=move_whole)
