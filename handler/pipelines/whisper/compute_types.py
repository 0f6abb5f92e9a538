"""The number formats a Whisper model runs in (``compute_type``, faster-whisper's name and values).

- ``float32``: openai-whisper as it is.
- ``int8`` (the CPU): the decoder's projection onto the vocabulary (the heaviest product of a small
  model's step: 51,864 tokens) as int8 weights with a scale per output row, its inputs quantised on
  the fly against each row's range (torch's dynamic quantisation and fbgemm's kernels on x86,
  :class:`RowScaledInt8Linear`); the logits that decide (each position's likeliest tokens, every
  special token) are then float32 products (:class:`Int8TextDecoder`). From medium's width on, the
  decoder blocks' linear layers too, their inputs in two passes. The encoder, layer norms, embeddings
  and attention stay float32 (bench/RESULTS.md).
- ``float16`` and ``bfloat16`` (CUDA): the weights of the linear layers and convolutions held in
  that format, activations in it too; layer norms and softmax in float32, as upstream runs fp16.
- ``auto``: ``int8`` on the CPU and ``float16`` on CUDA, unless PRECISION says otherwise
  (``full``: float32; ``half``: float16 on any device). openai-whisper's sequential path
  (``batch_size`` 1 without VAD, and text2video's captions) stays float32 on the CPU: there the
  worker promises ``whisper.transcribe``'s own result.

A copy in another format is made once, from the float32 weights, when its pool is loaded; each
format is a pipeline of its own (``handler.pipelines.whisper.pipeline.get_pipelines``).
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
import whisper.model
from torch import Tensor
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from whisper.model import TextDecoder, Whisper

from handler.config import WHISPER_COMPUTE_TYPES, Settings
from handler.errors import InvalidInput

# The formats a loaded model runs in (``auto`` resolved).
RUN_TYPES = tuple(name for name in WHISPER_COMPUTE_TYPES if name != "auto")
_DTYPES = {"float32": torch.float32, "int8": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve(compute_type: str, *, device: str, precision: str, sequential: bool = False) -> str:
    """The format ``compute_type`` means on ``device`` under the PRECISION setting, for the batched
    path or (``sequential``) openai-whisper's own."""
    if compute_type != "auto":
        return compute_type
    if precision == "full":
        return "float32"
    if precision == "half" or device == "cuda":
        return "float16"
    return "float32" if sequential else "int8"


def chosen(settings: Settings, device: str, asked: str | None, *, sequential: bool = False,
           field: str = "compute_type") -> str:
    """The format a job runs Whisper in: ``asked`` (its ``field``), else WHISPER_COMPUTE_TYPE, resolved;
    refused where it cannot run."""
    compute_type = resolve(asked or settings.whisper_compute_type, device=device, precision=settings.precision,
                           sequential=sequential)
    if compute_type == "int8" and device == "cuda":
        source = field if asked else "WHISPER_COMPUTE_TYPE"
        raise InvalidInput(f"{source}: int8 runs on the CPU only (torch's int8 kernels are the CPU's); "
                           "on CUDA use float16 or bfloat16", field=field)
    return compute_type


def activation_dtype(compute_type: str) -> torch.dtype:
    """The dtype of the activations (mel, encoder output) a model in ``compute_type`` takes."""
    return _DTYPES[compute_type]


def convert(model: Whisper, compute_type: str) -> Whisper:
    """``model`` (float32, on the CPU) in ``compute_type``, changed in place."""
    if compute_type == "int8":
        return _quantised(model)
    if compute_type in ("float16", "bfloat16"):
        dtype = _DTYPES[compute_type]
        for module in model.modules():
            if isinstance(module, whisper.model.Linear | whisper.model.Conv1d):
                module.to(dtype)
        return model
    return model


# The decoder's blocks are int8 from this width on (medium's 1024; large's and turbo's 1280): there a
# block's linear layers with the residual pass beat float32's at a step's 10 to 80 rows. At tiny's,
# base's and small's widths they were slower at the default batch's 40 rows (bench/RESULTS.md).
INT8_BLOCKS_FROM_WIDTH = 1024


def _quantised(model: Whisper) -> Whisper:
    # torch.ao's dynamic quantisation matches module types exactly, and whisper's Linear is a subclass
    # of nn.Linear whose only change is casting its weights to the input's dtype (a no-op in float32):
    # the blocks' layers are made plain nn.Linear where they are to be int8, and are left out otherwise.
    if model.dims.n_text_state >= INT8_BLOCKS_FROM_WIDTH:
        for module in model.decoder.modules():
            if type(module) is whisper.model.Linear:
                module.__class__ = torch.nn.Linear
    projection = torch.nn.Linear(model.dims.n_text_state, model.dims.n_vocab, bias=False)
    projection.weight = model.decoder.token_embedding.weight  # shared: the embedding stays float32
    model.decoder.add_module("vocab_projection", projection)
    # The decoder only. The encoder runs once per window, the decoder every step: the encoder in int8
    # raised the WER by half with one scale per window, and with a scale per row it was no faster
    # (bench/RESULTS.md).
    to_dynamic_int8(model.decoder)
    for module in model.decoder.modules():
        if type(module) is DynamicInt8Linear:
            # The projection's inputs in one pass: Int8TextDecoder computes the logits that decide in float32.
            RowScaledInt8Linear.adopt(module, residual_pass=module is not model.decoder.vocab_projection)
    model.decoder.__class__ = Int8TextDecoder
    cast(Int8TextDecoder, model.decoder).first_special = whisper.tokenizer.get_tokenizer(
        model.is_multilingual, num_languages=model.num_languages).eot
    return model


def to_dynamic_int8(module: torch.nn.Module) -> None:
    """Every plain ``nn.Linear`` in ``module`` replaced, in place, by torch's dynamic int8 layer with a
    scale per output row of its weight (as CTranslate2's int8)."""
    with warnings.catch_warnings():
        # torch 2.13 marks torch.ao.quantization deprecated in favour of torchao, whose int8 path has no
        # CPU kernels of its own; the fbgemm kernels used here are torch's (docs/architecture.md).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(module, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                         inplace=True)  # type: ignore[no-untyped-call]


class RowScaledInt8Linear(DynamicInt8Linear):
    """torch's dynamic int8 linear layer, each row of its input quantised against that row's own range,
    and (``residual_pass``) what that leaves quantised again.

    torch quantises a dynamic layer's whole input with one scale. A batched decoder step's input holds
    every beam of every window, and the row of largest magnitude set the step for all: int8's logits
    strayed from float32's several times further than with a scale per row, as CTranslate2 quantises
    (bench/RESULTS.md), and a row's result depended on the rows beside it. Here each row is divided
    by its largest magnitude before torch's kernel, with a row of -1 and +1 added so that torch's one
    range is always [-1, 1]; each output row is multiplied back and the bias, kept apart in float32,
    is added after. A row's result is then the same whatever rows share its batch (other jobs'
    windows, in the worker's batches).

    Quantising the inputs lost more than quantising the weights (bench/RESULTS.md). With
    ``residual_pass`` each row is first rounded onto torch's own grid for [-1, 1], so torch takes it
    exactly, and the rounding's remainder, scaled to [-1, 1] in turn, goes through the same kernel in
    the same call: the weights are read once for both, and the product is that of the input to about
    16 bits with the weights in 8.

    The inputs take 8 bits where the CPU's int8 product is exact (AVX-512 VNNI), else 7 (torch's
    ``reduce_range``): without VNNI, fbgemm sums pairs of 8-bit products in 16 bits, which can saturate.
    """

    float_bias: Tensor | None
    range_pin: Tensor
    reduce_range: bool
    residual_pass: bool
    grid_step: float
    grid_low: float
    grid_high: float

    @classmethod
    def adopt(cls, module: DynamicInt8Linear, *, residual_pass: bool = True) -> None:
        """``module`` (quantised by torch) turned into this class in place, its bias taken out of the packed weights."""
        module.__class__ = cls
        cast(RowScaledInt8Linear, module)._take_bias_apart(residual_pass)

    def _take_bias_apart(self, residual_pass: bool) -> None:
        bias, weight = self.bias(), self.weight()  # type: ignore[no-untyped-call]
        self.set_weight_bias(weight, None)
        self.float_bias = None if bias is None else bias.detach().clone()
        self.range_pin = torch.zeros(1, self.in_features)
        self.range_pin[0, :2] = torch.tensor([-1.0, 1.0])
        self.reduce_range = not exact_int8_products()
        self.residual_pass = residual_pass
        # The step and zero point torch's dynamic layer chooses for inputs in [-1, 1] (its own function).
        step, zero = torch._choose_qparams_per_tensor(self.range_pin, self.reduce_range)
        levels = 127 if self.reduce_range else 255
        self.grid_step, self.grid_low, self.grid_high = step, float(-zero), float(levels - zero)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        unit = (rows / scale).clamp_(-1.0, 1.0)
        packed = self._packed_params._packed_params
        if self.residual_pass:
            on_grid = unit.div(self.grid_step).round_().clamp_(self.grid_low, self.grid_high).mul_(self.grid_step)
            remainder = unit.sub_(on_grid)
            remainder_scale = remainder.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
            stacked = torch.cat([on_grid, remainder.div_(remainder_scale), self.range_pin])
            both = torch.ops.quantized.linear_dynamic(stacked, packed, reduce_range=self.reduce_range)
            count = rows.shape[0]
            y: Tensor = both[:count].addcmul_(both[count : 2 * count], remainder_scale)
        else:
            y = torch.ops.quantized.linear_dynamic(torch.cat([unit, self.range_pin]), packed,
                                                   reduce_range=self.reduce_range)[:-1]
        y = y.mul_(scale)
        if self.float_bias is not None:
            y = y.add_(self.float_bias)
        return y.reshape(*x.shape[:-1], self.out_features)


def exact_int8_products() -> bool:
    """Whether fbgemm's int8 products on this CPU are exact for 8-bit inputs: AVX-512 VNNI's
    instructions sum in 32 bits (torch's own check of the CPU's features)."""
    return bool(torch.cpu._is_vnni_supported())


# How many of a position's likeliest tokens (by the int8 projection) get float32 logits: a beam ranks
# beam_size + 1 of them (at most 11), with room for the ranks int8 swaps.
EXACT_TOKENS = 16
# The width of the column blocks _likeliest_columns reads the maxima of.
_COLUMN_BLOCK = 128


class Int8TextDecoder(TextDecoder):  # type: ignore[misc]  # whisper ships no type hints
    """openai-whisper's ``TextDecoder.forward`` (20250625), the logits from the int8 ``vocab_projection``
    instead of a float32 product with the token embedding's transpose, and those that decide in float32.

    The int8 projection finds each position's likeliest tokens; their logits, and those of every
    special token (end of text, the timestamps, the languages), are then float32 products. The
    search, the timestamp rules and the fallback's thresholds read those; the int8 logits of the other
    tokens only add their small share to the softmax's sum. The projection's weights were the int8
    decoder's largest error against float32 after its inputs' (bench/RESULTS.md).
    """

    vocab_projection: Any
    first_special: int

    def forward(self, x: Tensor, xa: Tensor, kv_cache: dict[Any, Tensor] | None = None) -> Tensor:
        offset = next(iter(kv_cache.values())).shape[1] if kv_cache else 0
        x = self.token_embedding(x) + self.positional_embedding[offset : offset + x.shape[-1]]
        x = x.to(xa.dtype)
        for block in self.blocks:
            x = block(x, xa, mask=self.mask, kv_cache=kv_cache)
        x = self.ln(x).float()
        return self.deciding_logits_in_float32(x, self.vocab_projection(x))

    def deciding_logits_in_float32(self, x: Tensor, logits: Tensor) -> Tensor:
        """``logits`` (int8's, for the decoder's output ``x``) with those of each position's likeliest
        tokens and of every special token replaced by float32 products."""
        embedding = self.token_embedding.weight
        likeliest = _likeliest_columns(logits, EXACT_TOKENS)
        logits.scatter_(-1, likeliest, torch.einsum("...d,...kd->...k", x, embedding[likeliest]))
        logits[..., self.first_special :] = x @ embedding[self.first_special :].T
        return logits


def _likeliest_columns(logits: Tensor, count: int) -> Tensor:
    """The columns of each row's ``count`` largest values, found in the ``count`` blocks of columns with
    the largest maxima (they hold them all): torch.topk over a row of 51,864 took more than half a step's
    int8 projection time. The last columns, past whole blocks, are never chosen: they are the last
    timestamps', which the caller computes in float32 anyway."""
    rows = logits.reshape(-1, logits.shape[-1])
    block_count = rows.shape[-1] // _COLUMN_BLOCK
    blocks = rows[:, : block_count * _COLUMN_BLOCK].view(-1, block_count, _COLUMN_BLOCK)
    best_blocks = blocks.amax(-1).topk(count, dim=-1).indices
    candidates = blocks.gather(1, best_blocks[..., None].expand(-1, -1, _COLUMN_BLOCK)).flatten(1)
    best = candidates.topk(count, dim=-1).indices
    columns = best_blocks.gather(1, best // _COLUMN_BLOCK) * _COLUMN_BLOCK + best % _COLUMN_BLOCK
    return columns.view(*logits.shape[:-1], count)
