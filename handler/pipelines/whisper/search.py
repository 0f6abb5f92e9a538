"""openai-whisper's per-step bookkeeping, with the same results and fewer tensor calls.

Each decoder step, upstream's beam search (``BeamSearchDecoder.update``) calls ``topk`` once
per beam and ``.item()`` on every candidate's score. Its timestamp rules
(``ApplyTimestampRules.apply``) loop over the rows in Python, with a ``logsumexp`` and a ``max``
per row: with several windows at beam 5, a large share of tiny.en's decoder step on the CPU.
Here each takes a few calls on the whole batch (the profile and what a job gains:
bench/RESULTS.md, fifth run). The algorithm is unchanged: the same candidates, ranked and
deduplicated in the same order, the same masks. ``tests/test_search.py`` compares them with
upstream's step by step.

    BeamSearch.of(decoder)        # in place of a BeamSearchDecoder
    TimestampRules.of(rules)      # in place of an ApplyTimestampRules
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own spelling)
from torch import Tensor
from whisper.decoding import ApplyTimestampRules, BeamSearchDecoder

Sequence = tuple[int, ...]


class BeamSearch(BeamSearchDecoder):  # type: ignore[misc]  # whisper ships no type hints
    """``BeamSearchDecoder`` whose update reads every beam's candidates in one ``topk``."""

    finished_sequences: list[dict[Sequence, float]] | None

    @classmethod
    def of(cls, decoder: BeamSearchDecoder) -> BeamSearch:
        return cls(decoder.beam_size, decoder.eot, decoder.inference, decoder.patience)

    def update(self, tokens: Tensor, logits: Tensor, sum_logprobs: Tensor) -> tuple[Tensor, bool]:
        if tokens.shape[0] % self.beam_size != 0:
            raise ValueError(f"{tokens.shape}[0] % {self.beam_size} != 0")
        n_audio = tokens.shape[0] // self.beam_size
        if self.finished_sequences is None:  # the first update
            self.finished_sequences = [{} for _ in range(n_audio)]
        finished_sequences = self.finished_sequences
        top, top_tokens = F.log_softmax(logits.float(), dim=-1).topk(self.beam_size + 1)
        # float32 sums, as upstream's sum_logprobs[idx] + logprob (then .item())
        scores_of, tokens_of = (sum_logprobs[:, None] + top).tolist(), top_tokens.tolist()
        prefixes = tokens.tolist()
        kept: list[Sequence] = []
        sources: list[int] = []
        kept_scores: list[float] = []
        newly_finished: list[dict[Sequence, float]] = []
        for first in range(0, tokens.shape[0], self.beam_size):
            scores: dict[Sequence, float] = {}
            source: dict[Sequence, int] = {}
            for row in range(first, first + self.beam_size):
                for score, token in zip(scores_of[row], tokens_of[row], strict=True):
                    sequence = (*prefixes[row], token)
                    scores[sequence] = score
                    source[sequence] = row
            newly_finished.append(self._rank(scores, source, kept, sources, kept_scores))
        # Each window keeps exactly beam_size sequences (a beam's beam_size + 1 candidates hold
        # at most one end of text), so the rows written are the window's own, as upstream's.
        sum_logprobs[: len(kept_scores)] = torch.tensor(kept_scores, dtype=sum_logprobs.dtype)
        self.inference.rearrange_kv_cache(sources)
        for previously, newly in zip(finished_sequences, newly_finished, strict=True):
            for sequence, score in newly.items():  # best first already (_rank)
                if len(previously) >= self.max_candidates:
                    break
                previously[sequence] = score
        completed = all(len(sequences) >= self.max_candidates for sequences in finished_sequences)
        return torch.tensor(kept, device=tokens.device), completed

    def _rank(self, scores: dict[Sequence, float], source: dict[Sequence, int], kept: list[Sequence],
              sources: list[int], kept_scores: list[float]) -> dict[Sequence, float]:
        """One window's candidates best first: the first beam_size unfinished are kept (appended
        to ``kept``, ``sources``, ``kept_scores``); the finished ones before them are returned."""
        finished: dict[Sequence, float] = {}
        saved = 0
        for sequence in sorted(scores, key=scores.__getitem__, reverse=True):
            if sequence[-1] == self.eot:
                finished[sequence] = scores[sequence]
                continue
            kept.append(sequence)
            sources.append(source[sequence])
            kept_scores.append(scores[sequence])
            saved += 1
            if saved == self.beam_size:
                break
        return finished


class TimestampRules(ApplyTimestampRules):  # type: ignore[misc]
    """``ApplyTimestampRules`` on every row at once."""

    @classmethod
    def of(cls, rules: ApplyTimestampRules) -> TimestampRules:
        return cls(rules.tokenizer, rules.sample_begin, rules.max_initial_timestamp_index)

    def apply(self, logits: Tensor, tokens: Tensor) -> None:
        begin, eot = self.tokenizer.timestamp_begin, self.tokenizer.eot
        if self.tokenizer.no_timestamps is not None:
            logits[:, self.tokenizer.no_timestamps] = -torch.inf
        sampled = tokens[:, self.sample_begin :]
        if sampled.shape[1] > 0:
            self._pairs_and_order(logits, sampled, begin, eot)
        if tokens.shape[1] == self.sample_begin:  # the first step: a timestamp, early enough
            logits[:, :begin] = -torch.inf
            if self.max_initial_timestamp_index is not None:
                logits[:, begin + self.max_initial_timestamp_index + 1 :] = -torch.inf
        # where the timestamps together are likelier than any text token, a timestamp it is
        logprobs = F.log_softmax(logits.float(), dim=-1)
        timestamp_wins = logprobs[:, begin:].logsumexp(dim=-1) > logprobs[:, :begin].amax(dim=-1)
        _hide(logits[:, :begin], timestamp_wins)

    @staticmethod
    def _pairs_and_order(logits: Tensor, sampled: Tensor, begin: int, eot: int) -> None:
        """Timestamps come in pairs (except right before the end), never decrease, and a segment
        is never empty."""
        is_timestamp = sampled >= begin
        last = is_timestamp[:, -1]
        penultimate = is_timestamp[:, -2] if sampled.shape[1] > 1 else torch.ones_like(last)
        _hide(logits[:, begin:], last & penultimate)  # a pair just closed: text next
        opened = last & ~penultimate
        _hide(logits[:, :eot], opened)  # a pair is open: its closing timestamp, or the end
        positions = torch.arange(sampled.shape[1], device=sampled.device)
        last_at = torch.where(is_timestamp, positions, 0).max(dim=1).values
        # The latest timestamp; in a row without one, a text token (below begin: nothing forbidden).
        latest = sampled.gather(1, last_at[:, None])[:, 0]
        # forbidden: [begin, latest) while a pair is open, [begin, latest] otherwise
        below = latest + (~opened).long() - begin
        timestamps = logits[:, begin:]
        columns = torch.arange(timestamps.shape[-1], device=logits.device)
        timestamps.masked_fill_(columns < below[:, None], -torch.inf)


def _hide(logits: Tensor, rows: Tensor) -> None:
    """-inf over the ``rows`` (a mask) of ``logits``: a fill of those rows alone, as upstream's
    per-row slices (a masked fill reads every row)."""
    logits.index_fill_(0, rows.nonzero().flatten(), -torch.inf)


def vectorised(task: Any) -> None:
    """Put :class:`BeamSearch` and :class:`TimestampRules` in a ``DecodingTask`` in place of upstream's."""
    if type(task.decoder) is BeamSearchDecoder:
        task.decoder = BeamSearch.of(task.decoder)
    task.logit_filters = [TimestampRules.of(f) if type(f) is ApplyTimestampRules else f for f in task.logit_filters]
