"""Import a CTranslate2 (faster-whisper) Whisper checkpoint into openai-whisper's format.

CTranslate2 stores a model as one ``model.bin``: a small header, then named tensors, then
aliases. Its Whisper layout differs from openai-whisper's mostly in names, plus two fused
projections that have to be split:

* self-attention ``linear_0`` is query, key and value stacked (the key half has a bias
  in CT2, always zero, which openai-whisper does not have);
* cross-attention ``linear_0`` is the query and ``linear_1`` is key and value stacked.

The result is the ``{"dims": ..., "model_state_dict": ...}`` dict that ``whisper.load_model``
reads, plus ``alignment_heads`` (openai-whisper's own base85 dump) so word timings use the
heads the model was tuned with instead of the default "last half of the layers".
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# CTranslate2's DataType enum, as written by its model_spec serializer.
_DTYPES: dict[int, Any] = {
    0: np.float32,
    1: np.int8,
    2: np.int16,
    3: np.int32,
    4: np.float16,
}
_SUPPORTED_VERSIONS = (5, 6)


class ConversionError(Exception):
    """The file is not a CTranslate2 Whisper model this converter understands."""


@dataclass(frozen=True)
class _Reader:
    """Cursor over the bytes of a ``model.bin``."""

    data: bytes
    offset: list[int]

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self.data, self.offset[0])
        self.offset[0] += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("<H")
        start = self.offset[0]
        self.offset[0] += length
        return self.data[start : start + length - 1].decode("utf-8")

    def raw(self, size: int) -> bytes:
        start = self.offset[0]
        self.offset[0] += size
        if self.offset[0] > len(self.data):
            raise ConversionError("model.bin is truncated")
        return self.data[start : start + size]


def read_ct2_variables(model_bin: Path) -> dict[str, np.ndarray]:
    """Every named tensor of a CTranslate2 ``model.bin``, aliases resolved."""
    reader = _Reader(model_bin.read_bytes(), [0])
    try:
        (version,) = reader.unpack("<I")
        if version not in _SUPPORTED_VERSIONS:
            raise ConversionError(f"unsupported CTranslate2 binary version {version}")
        spec = reader.string()
        if spec != "WhisperSpec":
            raise ConversionError(f"not a Whisper model: spec is {spec!r}")
        reader.unpack("<I")  # spec revision
        (count,) = reader.unpack("<I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(count):
            name = reader.string()
            (rank,) = reader.unpack("<B")
            shape = reader.unpack("<" + "I" * rank) if rank else ()
            (dtype_id,) = reader.unpack("<B")
            (size,) = reader.unpack("<I")
            if dtype_id not in _DTYPES:
                raise ConversionError(f"{name}: unsupported dtype id {dtype_id}")
            array = np.frombuffer(reader.raw(size), dtype=_DTYPES[dtype_id])
            variables[name] = array.reshape(shape)
        (aliases,) = reader.unpack("<I")
        for _ in range(aliases):
            alias, target = reader.string(), reader.string()
            variables[alias] = variables[target]
    except struct.error as exc:
        raise ConversionError("model.bin is truncated") from exc
    return variables


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy())


def _split(array: np.ndarray, parts: int) -> list[np.ndarray]:
    return list(np.split(array, parts, axis=0))


def _layer_norm(src: dict[str, np.ndarray], ct2: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": _tensor(src[f"{ct2}/gamma"]), f"{dst}.bias": _tensor(src[f"{ct2}/beta"])}


def _linear(
    src: dict[str, np.ndarray], ct2: str, dst: str, *, bias: bool = True
) -> dict[str, torch.Tensor]:
    out = {f"{dst}.weight": _tensor(src[f"{ct2}/weight"])}
    if bias:
        out[f"{dst}.bias"] = _tensor(src[f"{ct2}/bias"])
    return out


def _fused(src: dict[str, np.ndarray], ct2: str, dst: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """CTranslate2 fuses attention projections into one linear layer: split it into Whisper's
    ``query``/``key``/``value``. Whisper's key has no bias (CTranslate2 keeps zeros there)."""
    weights = _split(src[f"{ct2}/weight"], len(names))
    biases = _split(src[f"{ct2}/bias"], len(names))
    out = {}
    for name, weight, bias in zip(names, weights, biases, strict=True):
        out[f"{dst}.{name}.weight"] = _tensor(weight)
        if name != "key":
            out[f"{dst}.{name}.bias"] = _tensor(bias)
    return out


def _self_attention(src: dict[str, np.ndarray], ct2: str, dst: str) -> dict[str, torch.Tensor]:
    out = _fused(src, f"{ct2}/linear_0", dst, ("query", "key", "value"))
    out.update(_linear(src, f"{ct2}/linear_1", f"{dst}.out"))
    return out


def _cross_attention(src: dict[str, np.ndarray], ct2: str, dst: str) -> dict[str, torch.Tensor]:
    out = _linear(src, f"{ct2}/linear_0", f"{dst}.query")
    out.update(_fused(src, f"{ct2}/linear_1", dst, ("key", "value")))
    out.update(_linear(src, f"{ct2}/linear_2", f"{dst}.out"))
    return out


def _mlp(src: dict[str, np.ndarray], ct2: str, dst: str) -> dict[str, torch.Tensor]:
    out = _layer_norm(src, f"{ct2}/layer_norm", f"{dst}.mlp_ln")
    out.update(_linear(src, f"{ct2}/linear_0", f"{dst}.mlp.0"))
    out.update(_linear(src, f"{ct2}/linear_1", f"{dst}.mlp.2"))
    return out


def _count_layers(src: dict[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(rf"{prefix}/layer_(\d+)/")
    return len({match.group(1) for name in src if (match := pattern.match(name))})


def _encoder(src: dict[str, np.ndarray], layers: int) -> dict[str, torch.Tensor]:
    out = {"encoder.positional_embedding": _tensor(src["encoder/position_encodings/encodings"])}
    out.update(_linear(src, "encoder/conv1", "encoder.conv1"))
    out.update(_linear(src, "encoder/conv2", "encoder.conv2"))
    for i in range(layers):
        ct2, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        out.update(_layer_norm(src, f"{ct2}/self_attention/layer_norm", f"{dst}.attn_ln"))
        out.update(_self_attention(src, f"{ct2}/self_attention", f"{dst}.attn"))
        out.update(_mlp(src, f"{ct2}/ffn", dst))
    out.update(_layer_norm(src, "encoder/layer_norm", "encoder.ln_post"))
    return out


def _decoder(src: dict[str, np.ndarray], layers: int) -> dict[str, torch.Tensor]:
    out = {
        "decoder.token_embedding.weight": _tensor(src["decoder/embeddings/weight"]),
        "decoder.positional_embedding": _tensor(src["decoder/position_encodings/encodings"]),
    }
    for i in range(layers):
        ct2, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        out.update(_layer_norm(src, f"{ct2}/self_attention/layer_norm", f"{dst}.attn_ln"))
        out.update(_self_attention(src, f"{ct2}/self_attention", f"{dst}.attn"))
        out.update(_layer_norm(src, f"{ct2}/attention/layer_norm", f"{dst}.cross_attn_ln"))
        out.update(_cross_attention(src, f"{ct2}/attention", f"{dst}.cross_attn"))
        out.update(_mlp(src, f"{ct2}/ffn", dst))
    out.update(_layer_norm(src, "decoder/layer_norm", "decoder.ln"))
    return out


def _dims(src: dict[str, np.ndarray], encoder_layers: int, decoder_layers: int) -> dict[str, int]:
    audio_ctx, audio_state = src["encoder/position_encodings/encodings"].shape
    text_ctx, text_state = src["decoder/position_encodings/encodings"].shape
    return {
        "n_mels": int(src["encoder/conv1/weight"].shape[1]),
        "n_audio_ctx": int(audio_ctx),
        "n_audio_state": int(audio_state),
        "n_audio_head": int(src["encoder/num_heads"]),
        "n_audio_layer": encoder_layers,
        "n_vocab": int(src["decoder/embeddings/weight"].shape[0]),
        "n_text_ctx": int(text_ctx),
        "n_text_state": int(text_state),
        "n_text_head": int(src["decoder/num_heads"]),
        "n_text_layer": decoder_layers,
    }


def encode_alignment_heads(heads: list[list[int]], *, layers: int, heads_per_layer: int) -> bytes:
    """openai-whisper's alignment-head dump: base85 of a gzipped (layers x heads) bool mask."""
    mask = np.zeros((layers, heads_per_layer), dtype=bool)
    for layer, head in heads:
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes(), mtime=0))


def convert(model_dir: Path) -> dict[str, Any]:
    """The openai-whisper checkpoint dict for the CTranslate2 model in ``model_dir``."""
    src = read_ct2_variables(model_dir / "model.bin")
    encoder_layers = _count_layers(src, "encoder")
    decoder_layers = _count_layers(src, "decoder")
    dims = _dims(src, encoder_layers, decoder_layers)
    state = _encoder(src, encoder_layers)
    state.update(_decoder(src, decoder_layers))
    checkpoint: dict[str, Any] = {"dims": dims, "model_state_dict": state}
    config_path = model_dir / "config.json"
    if config_path.exists():
        heads = json.loads(config_path.read_text()).get("alignment_heads")
        if heads:
            checkpoint["alignment_heads"] = encode_alignment_heads(
                heads, layers=decoder_layers, heads_per_layer=dims["n_text_head"]
            )
    return checkpoint


def convert_to_file(model_dir: Path, target: Path) -> Path:
    """Convert and write atomically, so a half-written checkpoint is never loaded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    torch.save(convert(model_dir), partial)
    partial.replace(target)
    return target
