"""The vectorised beam search update and timestamp rules give what openai-whisper's loops give."""

from __future__ import annotations

import pytest
import torch
from whisper.decoding import ApplyTimestampRules, BeamSearchDecoder
from whisper.tokenizer import get_tokenizer

from handler.pipelines.whisper.search import BeamSearch, TimestampRules

TOKENIZER = get_tokenizer(multilingual=False)
VOCAB = TOKENIZER.timestamp_begin + 1501
SAMPLE_BEGIN = 3


class Rearranged:
    """Stands in for whisper's Inference: records the source rows each step keeps."""

    def __init__(self) -> None:
        self.sources: list[list[int]] = []

    def rearrange_kv_cache(self, sources: list[int]) -> None:
        self.sources.append(list(sources))


def step_logits(generator: torch.Generator, rows: int, step: int) -> torch.Tensor:
    """Logits whose best tokens are few (so beams meet on the same sequences) and where the end
    of text often ranks high, from the third step on."""
    logits = torch.randn(rows, VOCAB, generator=generator) * 0.1
    logits[:, :8] += torch.randn(rows, 8, generator=generator) * 3
    if step >= 2:
        logits[:, TOKENIZER.eot] += torch.randn(rows, generator=generator) * 3
    return logits


@pytest.mark.parametrize(("windows", "beam_size", "patience"), [(1, 5, None), (3, 5, None), (2, 3, 2.0)])
def test_beam_search_keeps_what_upstream_keeps(windows: int, beam_size: int, patience: float | None) -> None:
    """Step after step, the same kept sequences, scores (to the bit), cache rearrangement, finished
    candidates and completion as upstream's BeamSearchDecoder, beams sharing a start included."""
    generator = torch.Generator().manual_seed(windows * 10 + beam_size)
    rows = windows * beam_size
    upstream_cache, ours_cache = Rearranged(), Rearranged()
    upstream = BeamSearchDecoder(beam_size, TOKENIZER.eot, upstream_cache, patience)
    ours = BeamSearch.of(BeamSearchDecoder(beam_size, TOKENIZER.eot, ours_cache, patience))
    tokens = torch.tensor([[TOKENIZER.sot, 1, 2]] * rows)
    sum_upstream, sum_ours = torch.zeros(rows), torch.zeros(rows)
    for step in range(12):
        logits = step_logits(generator, rows, step)
        tokens_upstream, done_upstream = upstream.update(tokens.clone(), logits.clone(), sum_upstream)
        tokens_ours, done_ours = ours.update(tokens.clone(), logits.clone(), sum_ours)
        assert torch.equal(tokens_ours, tokens_upstream), step
        assert torch.equal(sum_ours, sum_upstream), step
        assert ours.finished_sequences == upstream.finished_sequences, step
        assert list(map(list, ours.finished_sequences)) == list(map(list, upstream.finished_sequences))
        assert done_ours == done_upstream
        tokens = tokens_upstream
    assert ours_cache.sources == upstream_cache.sources
    assert any(ours.finished_sequences), "the test never finished a sequence"


def histories(generator: torch.Generator, rows: int, length: int) -> torch.Tensor:
    """Token rows of ``SAMPLE_BEGIN`` prompt tokens then ``length`` sampled ones, text and
    non-decreasing timestamps mixed, ending every way (text, one timestamp, a pair)."""
    out = torch.zeros(rows, SAMPLE_BEGIN + length, dtype=torch.long)
    out[:, 0] = TOKENIZER.sot
    for row in range(rows):
        stamp = TOKENIZER.timestamp_begin + int(torch.randint(0, 50, (1,), generator=generator))
        for col in range(SAMPLE_BEGIN, SAMPLE_BEGIN + length):
            if torch.rand(1, generator=generator) < 0.4:
                stamp += int(torch.randint(0, 20, (1,), generator=generator))
                out[row, col] = stamp
            else:
                out[row, col] = int(torch.randint(0, TOKENIZER.eot, (1,), generator=generator))
    return out


@pytest.mark.parametrize("max_initial", [None, 50])
@pytest.mark.parametrize("length", [0, 1, 2, 3, 6, 12])
def test_timestamp_rules_mask_what_upstream_masks(length: int, max_initial: int | None) -> None:
    """The same logits after the rules, for rows with no sampled token, one, and many; the
    timestamp-wins rule engaged on some rows and not on others."""
    generator = torch.Generator().manual_seed(length)
    rows = 40
    tokens = histories(generator, rows, length)
    logits = torch.randn(rows, VOCAB, generator=generator)
    # On a third of the rows one text token is likelier than all timestamps together: there the
    # timestamp-wins rule does not hide what the pair rules mask.
    logits[1::3, torch.randint(0, TOKENIZER.eot, (1,), generator=generator)] += 12
    upstream = ApplyTimestampRules(TOKENIZER, SAMPLE_BEGIN, max_initial)
    ours = TimestampRules.of(upstream)
    expected, found = logits.clone(), logits.clone()
    upstream.apply(expected, tokens.clone())
    ours.apply(found, tokens.clone())
    assert torch.equal(found, expected)
    if length:  # (on the first step every row is held to a timestamp alike)
        masked = torch.isinf(expected).sum(dim=1)
        assert len(set(masked.tolist())) > 1, "every row masked alike: the test shows too little"

