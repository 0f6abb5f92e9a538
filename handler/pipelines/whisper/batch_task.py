"""The decoder: openai-whisper's ``DecodingTask``, batched. Several windows, each with a prompt of its
own, through one decoder loop, greedy or beam search, with temperature fallback per window.

Memory: the decoder's cross-attention keys and values are computed once per window and shared
by its beams or samples (see :class:`BatchDecodingTask`): large-v3 in fp16 takes ~250 MB per
window, so batch 8 is ~2 GB on top of the weights, whatever ``beam_size``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor
from whisper.decoding import DecodingOptions, DecodingResult, DecodingTask, PyTorchInference
from whisper.model import Whisper

from handler.pipelines.whisper.options import DecodeOptions
from handler.pipelines.whisper.search import vectorised


def decode_prompted(
    model: Whisper, features: Tensor, options: DecodeOptions, prompts: Sequence[tuple[int, ...]]
) -> list[DecodingResult]:
    """:func:`decode_with_fallback` for windows with prompts of their own.

    The windows of one decoder loop share a prompt length (Whisper's decoder has no padding
    mask): those with a prompt are decoded together, each prompt cut to the shortest one's length
    (keeping its last tokens, as whisper.transcribe cuts a long prompt); those without, apart.
    """
    results: dict[int, DecodingResult] = {}
    for prompted in (False, True):
        rows = [index for index, prompt in enumerate(prompts) if bool(prompt) == prompted]
        if not rows:
            continue
        length = min(len(prompts[index]) for index in rows)
        tokens = torch.tensor([prompts[index][len(prompts[index]) - length :] for index in rows]) if length else None
        for index, result in zip(rows, decode_with_fallback(model, features[rows], options, tokens), strict=True):
            results[index] = result
    return [results[index] for index in range(len(prompts))]


def decode_with_fallback(
    model: Whisper, features: Tensor, options: DecodeOptions, prompts: Tensor | None = None
) -> list[DecodingResult]:
    """One result per row of ``features`` (encoder output, one row per window); ``prompts``, one
    row of prompt tokens per window (of one length), or None.

    All rows are decoded at the first temperature; then only the rows that still need a
    fallback are decoded again, together, at the next one.
    """
    results: dict[int, DecodingResult] = {}
    pending = list(range(features.shape[0]))
    length = 0 if prompts is None else prompts.shape[1]
    for temperature in options.temperatures:
        rows = None if prompts is None else prompts[pending]
        task = BatchDecodingTask(model, options.at(temperature, length), prompts=rows)
        decoded = task.run(features[pending])
        for index, result in zip(pending, decoded, strict=True):
            results[index] = result
        pending = [index for index, result in zip(pending, decoded, strict=True) if options.needs_fallback(result)]
        if not pending:
            break
    return [results[index] for index in range(features.shape[0])]


class BatchDecodingTask(DecodingTask):  # type: ignore[misc]  # whisper ships no type hints
    """openai-whisper's ``DecodingTask``, able to run beam search or best-of on several windows.

    Upstream (20250625) repeats the prompt tokens ``n_group`` times per window (one row per beam
    or sample) but keeps the encoder output at one row per window. With one window, attention
    broadcasts the single row over all beams; with ``n`` windows, the decoder's cross-attention
    gets ``n * n_group`` query rows against ``n`` key/value rows and fails ("The size of tensor a
    (10) must match the size of tensor b (2) at non-singleton dimension 0"). ``run`` even slices
    ``audio_features[:: n_group]`` afterwards, which only makes sense for repeated features.
    Here the features are repeated per beam for ``run``'s bookkeeping only (language detection
    sees one row per window); the decoder loop gets one row per window, and each window's beams
    attend to it together (:meth:`_main_loop`). A single window keeps upstream's broadcast.
    """

    def __init__(self, model: Whisper, options: DecodingOptions, *, prompts: Tensor | None = None) -> None:
        """``prompts``: one row of prompt tokens per window (one length), written over the
        placeholder prompt that ``options`` carries (``DecodeOptions.at``)."""
        super().__init__(model, options)
        self._prompts = prompts
        self.inference: Any = BufferedInference(model, len(self.initial_tokens))
        if hasattr(self.decoder, "inference"):  # beam search rearranges the cache it was given
            self.decoder.inference = self.inference
        vectorised(self)  # upstream's beam search update and timestamp rules, on the whole batch at once

    def _get_audio_features(self, mel: Tensor) -> Tensor:
        # Given the encoder's output (decoding._decode_round encodes a batch once for all its
        # temperatures): upstream's check of its dtype knows float16 and float32 only, not bfloat16.
        encoded = mel.shape[-2:] == (self.model.dims.n_audio_ctx, self.model.dims.n_audio_state)
        features: Tensor = mel if encoded else super()._get_audio_features(mel)
        if self.n_group == 1 or features.shape[0] == 1:
            return features
        return features.repeat_interleave(self.n_group, dim=0)

    def _detect_language(self, audio_features: Tensor, tokens: Tensor) -> Any:
        if self.n_group > 1 and audio_features.shape[0] == tokens.shape[0] * self.n_group:
            audio_features = audio_features[:: self.n_group]
        if self._prompts is not None:  # each window's own prompt, after sot_prev (upstream writes languages here too)
            tokens[:, 1 : 1 + self._prompts.shape[1]] = self._prompts
        return super()._detect_language(audio_features, tokens)

    def _main_loop(self, audio_features: Tensor, tokens: Tensor) -> Any:
        """The decoder loop on one row of encoder output per window, its beams sharing it.

        Cross-attention keys and values are then projected and read once per window instead of
        once per beam, the decoder's heaviest reads divided by the beam size, with the same tokens
        (``tests/test_decoding.py``; what it gains: bench/RESULTS.md). A single window's beams
        attend as one row too: torch's CPU attention is much slower on upstream's broadcast of one
        key/value row over the beams than on their queries in one row (bench/RESULTS.md).
        """
        sot_index: int = self.sot_index  # type: ignore[has-type]  # set by whisper's untyped __init__
        self.sot_index = 0  # the first step's logits begin at sot (_logits_from)
        if self.n_group > 1:
            self.inference.logits = _initial_pass_once_per_window(self.inference, self.n_group)
        try:
            with _logits_from(self.model, sot_index):
                if self.n_group == 1:
                    return super()._main_loop(audio_features, tokens)
                if audio_features.shape[0] == tokens.shape[0]:  # repeated per beam (_get_audio_features)
                    audio_features = audio_features[:: self.n_group]
                with _beams_share_cross_attention(self.model):
                    return super()._main_loop(audio_features, tokens)
        finally:
            self.sot_index = sot_index


class BufferedInference(PyTorchInference):  # type: ignore[misc]  # whisper ships no type hints
    """Upstream's ``PyTorchInference`` with each self-attention layer's keys and values written in place
    into a buffer that grows by half when full, rather than concatenated anew every step (a copy of the
    whole cache per layer and step, as long as a 223-token prompt and the text so far).

    Beam search's reordering copies only the positions after the initial tokens: every beam of a
    window starts from the same initial tokens (prompt and start), so those positions of the cache
    hold the same keys and values in each of a window's rows, and beams move only within their
    window. The same tokens as upstream's cache (``tests/test_decoding.py``).
    """

    kv_cache: dict[Any, Tensor]
    kv_modules: list[torch.nn.Module]
    initial_token_length: int

    def logits(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        if not self.kv_cache:
            self.kv_cache, self.hooks = self._install_hooks()
        if tokens.shape[-1] > self.initial_token_length:
            tokens = tokens[:, -1:]  # only the last token after the first pass, as upstream
        return cast(Tensor, self.model.decoder(tokens, audio_features, kv_cache=self.kv_cache))

    def _install_hooks(self) -> tuple[dict[Any, Tensor], list[Any]]:
        cache: dict[Any, Tensor] = {}
        buffers: dict[Any, Tensor] = {}
        self_attention = set(self.kv_modules)
        most = self.model.dims.n_text_ctx

        def save(module: torch.nn.Module, _args: Any, output: Tensor) -> Tensor:
            if module not in self_attention:  # cross-attention: computed once, kept as it is (upstream)
                cache[module] = output
                return output
            previous, buffer = cache.get(module), buffers.get(module)
            length = 0 if previous is None else previous.shape[1]
            if previous is not None and (buffer is None or previous.data_ptr() != buffer.data_ptr()
                                         or previous.shape[0] != buffer.shape[0]):
                buffer = None  # the cache was replaced (its rows repeated per beam): start a buffer from it
            needed = length + output.shape[1]
            if buffer is None or buffer.shape[1] < needed:
                grown = output.new_empty(output.shape[0], min(most, max(needed + 16, needed * 3 // 2)),
                                         output.shape[2])
                if previous is not None:
                    grown[:, :length] = previous
                buffer = buffers[module] = grown
            buffer[:, length:needed] = output
            cache[module] = buffer[:, :needed]
            return cache[module]

        hooks = []
        for block in self.model.decoder.blocks:
            hooks += [block.attn.key.register_forward_hook(save), block.attn.value.register_forward_hook(save)]
            if block.cross_attn is not None:
                hooks += [block.cross_attn.key.register_forward_hook(save),
                          block.cross_attn.value.register_forward_hook(save)]
        return cache, hooks

    def rearrange_kv_cache(self, source_indices: list[int]) -> None:
        if source_indices == list(range(len(source_indices))):
            return
        start = self.initial_token_length
        for module in self.kv_modules:
            view = self.kv_cache[module]
            if view.shape[1] > start:
                view[:, start:] = view[source_indices, start:]


def _initial_pass_once_per_window(inference: Any, n_group: int) -> Callable[[Tensor, Tensor], Tensor]:
    """``inference.logits`` with its first pass (the prompt and start tokens, the same for every
    beam of a window) run on one row per window, its self-attention cache then copied per beam.

    Upstream runs it on every beam: with a 223-token prompt at beam 5, 1,115 rows of prompt
    through the decoder per window instead of 223.
    """
    logits = inference.logits

    def first_pass_shared(tokens: Tensor, audio_features: Tensor) -> Tensor:
        if tokens.shape[-1] != inference.initial_token_length or inference.kv_cache:
            return cast(Tensor, logits(tokens, audio_features))
        found = cast(Tensor, logits(tokens[::n_group], audio_features))  # one window's beams start alike
        for module in inference.kv_modules:
            inference.kv_cache[module] = inference.kv_cache[module].repeat_interleave(n_group, dim=0)
        return found.repeat_interleave(n_group, dim=0)

    return first_pass_shared


@contextmanager
def _logits_from(model: Whisper, start: int) -> Iterator[None]:
    """While held, the decoder's first pass over the initial tokens yields logits from position
    ``start`` (sot) on: the decoding loop reads only those at sot (no-speech) and at the last token.

    Upstream projects every position onto the 51,864-token vocabulary, so a 200-token prompt
    cost as much as 200 decoding steps of its beams (the heaviest product of tiny.en's step).
    """
    def last_positions(_module: torch.nn.Module, _args: Any, output: Tensor) -> Tensor | None:
        return output[:, start:] if output.shape[1] > 1 else None

    hook = model.decoder.ln.register_forward_hook(last_positions)
    try:
        yield
    finally:
        hook.remove()


@contextmanager
def _beams_share_cross_attention(model: Whisper) -> Iterator[None]:
    """While held, a decoder query batch of ``g`` rows per encoder row attends as one row of ``g``
    times the queries: the same attention (cross-attention has no mask), on K/V read once."""
    modules = [block.cross_attn for block in model.decoder.blocks if block.cross_attn is not None]
    for module in modules:
        module.qkv_attention = functools.partial(_grouped_attention, type(module).qkv_attention.__get__(module))
    try:
        yield
    finally:
        for module in modules:
            del module.qkv_attention


Attend = Callable[..., tuple[Tensor, Tensor | None]]


def _grouped_attention(
    attend: Attend, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    rows, groups = k.shape[0], q.shape[0] // k.shape[0]
    if groups == 1 or mask is not None:
        return attend(q, k, v, mask)
    n_ctx = q.shape[1]
    out, qk = attend(q.reshape(rows, groups * n_ctx, q.shape[2]), k, v)
    if qk is not None:  # (rows, heads, groups * n_ctx, keys) -> (rows * groups, heads, n_ctx, keys)
        qk = qk.reshape(rows, qk.shape[1], groups, n_ctx, qk.shape[3]).transpose(1, 2).flatten(0, 1)
    return out.reshape(rows * groups, n_ctx, out.shape[2]), qk
