"""VITS synthesis: text cut into sentences, each spoken on its own, the pieces joined with a short pause.

The ``speech`` task and ``text2video``'s narration both speak through this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from handler.cancel import CancelToken
from handler.errors import InputTooLarge, InvalidInput
from handler.pipelines.weights import pretrained_source
from handler.runtime.container import Runtime
from handler.runtime.instances import InstancePool, Placement, move_whole
from handler.runtime.memory import MIB, module_bytes
from handler.runtime.registry import PipelineKey

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_SOFT_BREAK = re.compile(r"(?<=[,])\s+|\s+")
# VITS attends over the whole input at once; longer pieces cost quadratic memory.
_MAX_PIECE_CHARS = 400
_PAUSE_S = 0.2


def split_sentences(text: str, *, max_chars: int = _MAX_PIECE_CHARS) -> list[str]:
    """Sentences of ``text``; a sentence over ``max_chars`` is cut at commas, then spaces."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        sentence = sentence.strip()
        while len(sentence) > max_chars:
            cut = max((m.start() for m in _SOFT_BREAK.finditer(sentence, 0, max_chars)), default=max_chars)
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence)
    return pieces


def pieces_to_say(text: str, *, limit: int, field: str = "text") -> list[str]:
    """The pieces to synthesise, after the length limit; refused before any model work."""
    if len(text) > limit:
        raise InputTooLarge(f"{field}: {len(text)} characters, the limit is {limit}", field=field)
    pieces = split_sentences(text)
    if not pieces:
        raise InvalidInput(f"{field}: nothing to say", field=field)
    return pieces


@dataclass
class SpeechPipeline:
    """A VITS model and its tokenizer. The pace is set on the model, so a call needs the
    instance to itself: the InstancePool lends each instance to one job at a time."""

    model: Any  # transformers.VitsModel
    tokenizer: Any
    name: str
    device: str

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    def to(self, device: str) -> None:
        """Move the weights (the residency parks an idle model in host RAM and brings it back)."""
        self.model.to(device)

    def speakable(self, pieces: list[str], *, field: str = "text") -> list[str]:
        """The pieces the tokenizer makes any input of (emoji alone make none); refused when none is."""
        kept = [piece for piece in pieces if len(self.tokenizer(piece)["input_ids"]) > 0]
        if not kept:
            raise InvalidInput(f"{field}: nothing speakable (no letters the voice knows)", field=field)
        return kept

    def synthesize(
        self, pieces: list[str], *, speaking_rate: float, seed: int, cancel: CancelToken, field: str = "text"
    ) -> np.ndarray:
        """Narration samples (float32, mono) at ``sample_rate``; refused when nothing came out."""
        pause = np.zeros(int(_PAUSE_S * self.sample_rate), dtype=np.float32)
        parts: list[np.ndarray] = []
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            self.model.speaking_rate = speaking_rate
            for index, piece in enumerate(pieces):
                cancel.check()
                torch.manual_seed(seed + index)
                inputs = self.tokenizer(piece, return_tensors="pt").to(self.device)
                if inputs["input_ids"].shape[-1] == 0:
                    continue
                waveform = self.model(**inputs).waveform[0].float().cpu().numpy()
                if parts:
                    parts.append(pause)
                parts.append(waveform)
        samples = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        if samples.size == 0:
            raise InvalidInput(f"{field}: nothing speakable", field=field)
        return samples


def load_speech(name: str, runtime: Runtime) -> SpeechPipeline:
    # Imported here: transformers costs seconds at start-up, and most jobs never speak.
    from transformers import AutoTokenizer, VitsModel

    source, options = pretrained_source(name, runtime.settings)
    # Built in host RAM: the residency places it on the device when a job holds it.
    model: Any = VitsModel.from_pretrained(source, **options)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source, **options)
    return SpeechPipeline(model, tokenizer, name, runtime.device)


def get_pipelines(runtime: Runtime, name: str) -> InstancePool[SpeechPipeline]:
    """MODEL_INSTANCES copies of the speech model ``name`` (fp32 on every device), loaded on first use."""
    key = PipelineKey("speech", name, runtime.device, "float32")
    count = runtime.settings.model_instances
    return runtime.registry.get(
        key, lambda: InstancePool.build(count, lambda: load_speech(name, runtime), _placement))


def _placement(pipeline: SpeechPipeline) -> Placement:
    return Placement(weights=module_bytes(pipeline.model), move=move_whole)


def working_bytes(pieces: list[str]) -> int:
    """GPU memory one synthesis takes beyond the weights: VITS makes one piece (a sentence) at a
    time, so a fixed allowance whatever the text's length (an estimate; bench/README's run-book
    measures it)."""
    return 256 * MIB if pieces else 0
