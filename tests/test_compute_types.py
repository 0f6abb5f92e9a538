"""The number formats Whisper runs in (``compute_type``), on real tiny.en weights and real speech."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import pytest
import torch
import whisper.model
import whisper.tokenizer
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from whisper.normalizers import EnglishTextNormalizer

from handler.config import WHISPER_COMPUTE_TYPES, Settings
from handler.errors import InvalidInput
from handler.pipelines.whisper import compute_types, decoding, vad
from handler.pipelines.whisper.pipeline import get_pipelines, load_checkpoint
from handler.pipelines.whisper.windows import prepare_windows
from testkit import media, speech_corpus
from tests.conftest import b64, job, run_job


@pytest.fixture(scope="module")
def real_speech() -> speech_corpus.Utterance:
    """About 40 s of real read speech: the LibriVox clips and MFA's LibriSpeech utterance, each once, with pauses."""
    cache = speech_corpus.default_cache()
    return speech_corpus.long_form(speech_corpus.librivox(cache) + speech_corpus.mfa(cache)[:1], seed=3,
                                   target_s=30.0)


def _tiny_en(model_dir: Path, compute_type: str = "float32") -> whisper.model.Whisper:
    return compute_types.convert(load_checkpoint(model_dir / "whisper" / "tiny.en.pt", "cpu"), compute_type)


def _wer(reference: str, text: str) -> float:
    normalise = EnglishTextNormalizer()
    return float(jiwer.wer(normalise(reference), normalise(text)))


def _wide_random_model(width: int = compute_types.INT8_BLOCKS_FROM_WIDTH) -> whisper.model.Whisper:
    """A random English Whisper of one block each way at ``width`` (medium's unless given), on a short context."""
    dims = whisper.model.ModelDimensions(n_mels=80, n_audio_ctx=16, n_audio_state=width, n_audio_head=16,
                                         n_audio_layer=1, n_vocab=51864, n_text_ctx=32, n_text_state=width,
                                         n_text_head=16, n_text_layer=1)
    torch.manual_seed(0)
    return whisper.model.Whisper(dims).eval()


def test_int8_on_tiny_is_its_vocabulary_projection_and_the_rest_as_it_was(model_dir: Path) -> None:
    """tiny.en in int8: the projection onto the vocabulary is torch's dynamic int8 layer with a scale per
    output row; the decoder's blocks, the encoder and the embeddings are the checkpoint's float32."""
    plain, int8 = _tiny_en(model_dir), _tiny_en(model_dir, "int8")
    quantised = [m for m in int8.decoder.modules() if isinstance(m, DynamicInt8Linear)]
    assert quantised == [int8.decoder.vocab_projection]
    assert type(quantised[0]) is compute_types.RowScaledInt8Linear and not quantised[0].residual_pass
    assert quantised[0].weight().qscheme() == torch.per_channel_affine
    assert int8.decoder.vocab_projection.weight().shape == plain.decoder.token_embedding.weight.shape
    kept = int8.state_dict()
    for name, weight in plain.state_dict().items():
        assert torch.equal(kept[name], weight), name
    assert int8.decoder.first_special == whisper.tokenizer.get_tokenizer(False).eot


def test_wide_decoders_take_their_blocks_in_int8_with_the_residual_pass() -> None:
    """From medium's width on, every linear layer of the decoder's blocks is int8 too, its inputs in two
    passes; the projection's in one. At small's width, the blocks stay float32."""
    int8 = compute_types.convert(_wide_random_model(), "int8")
    quantised = [m for m in int8.decoder.modules() if isinstance(m, DynamicInt8Linear)]
    # Per block: query, key, value, out of self- and cross-attention, two MLP layers; and the projection.
    assert len(quantised) == 10 * len(int8.decoder.blocks) + 1
    assert all(type(m) is compute_types.RowScaledInt8Linear for m in quantised)
    assert [m.residual_pass for m in quantised] == [m is not int8.decoder.vocab_projection for m in quantised]
    assert not [m for m in int8.encoder.modules() if isinstance(m, DynamicInt8Linear)]
    narrower = compute_types.convert(_wide_random_model(768), "int8")
    assert [m for m in narrower.decoder.modules() if isinstance(m, DynamicInt8Linear)] == [
        narrower.decoder.vocab_projection]


def test_the_logits_that_decide_are_float32s(model_dir: Path, real_speech: speech_corpus.Utterance) -> None:
    """On a window of real speech and its transcript's tokens, the int8 decoder's likeliest tokens at every
    position, their logits, and every special token's (end of text, timestamps), are float32's; the
    other tokens' int8 logits stay near float32's."""
    plain, int8 = _tiny_en(model_dir), _tiny_en(model_dir, "int8")
    audio = real_speech.audio[: 30 * speech_corpus.SAMPLE_RATE]
    window = prepare_windows(plain, audio, [vad.Chunk(0, len(audio))])[0]
    tokenizer = whisper.tokenizer.get_tokenizer(False, language="en", task="transcribe")
    tokens = torch.tensor([[*tokenizer.sot_sequence_including_notimestamps,
                            *tokenizer.encode(" " + real_speech.text)[:120]]])
    with torch.no_grad():
        features = plain.encoder(window.mel[None])
        expected, found = plain.decoder(tokens, features), int8.decoder(tokens, features)
    # The ranks a beam of 10 reads (beam_size + 1), in order, with their values.
    ranked = expected.topk(11, dim=-1)
    assert torch.equal(found.topk(11, dim=-1).indices, ranked.indices)
    torch.testing.assert_close(found.gather(-1, ranked.indices), ranked.values, rtol=0, atol=1e-4)
    torch.testing.assert_close(found[..., tokenizer.eot :], expected[..., tokenizer.eot :], rtol=0, atol=1e-4)
    # 0.025 measured: the int8 logits of the tokens that decide nothing.
    relative = ((found - expected).norm() / expected.norm()).item()
    assert relative < 0.04, relative


def test_likeliest_columns_are_torchs_top_k() -> None:
    """The block maxima's shortcut finds the columns torch.topk finds, where the largest values crowd into
    one block as where they are spread, for English and multilingual vocabularies."""
    generator = torch.Generator().manual_seed(2)
    for width in (51864, 51865, 51866):
        logits = torch.randn(6, 3, width, generator=generator)
        logits[0, 0, 1000:1040] += 10  # forty of the largest, in two neighbouring blocks of 128
        logits[1, 1, ::4096] += 10  # one in each of a dozen blocks
        found = compute_types._likeliest_columns(logits, compute_types.EXACT_TOKENS)
        whole_blocks = width // 128 * 128  # the columns past them are timestamps', float32 anyway
        expected = logits[..., :whole_blocks].topk(compute_types.EXACT_TOKENS, dim=-1).indices
        assert torch.equal(found.sort(-1).values, expected.sort(-1).values), width


def test_int8_transcribes_real_speech_as_well_as_float32(model_dir: Path, real_speech: speech_corpus.Utterance) -> None:
    """The batched path in int8 on 40 s of real speech (88 words): within 2 points of float32's WER against
    the reference (the same WER measured, with 8-bit and with 7-bit inputs). The benchmark measures both
    over a thousand words in each of two sets (bench/RESULTS.md)."""
    chunks = vad.speech_chunks(real_speech.audio)
    options = {"language": "en", "beam_size": 5}
    results = {name: decoding.transcribe_chunks(_tiny_en(model_dir, name), real_speech.audio, chunks,
                                                options=options, batch_size=8)["text"]
               for name in ("float32", "int8")}
    wer = {name: _wer(real_speech.text, text) for name, text in results.items()}
    assert wer["float32"] < 0.15, wer
    assert wer["int8"] <= wer["float32"] + 0.02, (wer, results)


def test_each_input_row_is_quantised_against_its_own_range() -> None:
    """A decoder step's rows (every beam of every window, other jobs' windows too) differ in range: each
    row's result is the one it gets alone, to the bit, whatever rows share its batch, and a quiet row
    keeps its precision beside a loud one. With one scale for the whole input (torch's own layer) the
    quiet row would be quantised in the loud row's steps, a hundred times coarser. So in one pass (the
    projection: 0.009 of the product measured) and with the residual pass (a wide decoder's blocks:
    0.00004)."""
    plain, int8 = _wide_random_model(), compute_types.convert(_wide_random_model(), "int8")
    generator = torch.Generator().manual_seed(0)
    quiet = torch.randn(1, plain.dims.n_text_state, generator=generator)
    loud = 100 * torch.randn(1, plain.dims.n_text_state, generator=generator)
    rows = torch.cat([quiet, loud, quiet.abs()])  # the last one all positive

    def error(found: torch.Tensor, expected: torch.Tensor) -> float:
        return ((found - expected).norm() / expected.norm()).item()

    for layer, float_layer, bound in [(int8.decoder.vocab_projection, None, 0.02),
                                      (int8.decoder.blocks[0].mlp[0], plain.decoder.blocks[0].mlp[0], 2e-4)]:
        # The int8 weights with the model's own bias against float inputs: what is left is the inputs' quantisation.
        exact = torch.nn.functional.linear(rows, layer.weight().dequantize(),
                                           None if float_layer is None else float_layer.bias)
        with torch.no_grad():
            together = layer(rows)
            alone = torch.cat([layer(row[None]) for row in rows])
        assert torch.equal(together, alone)
        for found, expected in zip(together, exact, strict=True):
            assert error(found, expected) < bound, (layer.residual_pass, error(found, expected))


def test_inputs_take_eight_bits_where_the_cpu_sums_them_exactly(model_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """8-bit inputs only where fbgemm's int8 product cannot saturate (AVX-512 VNNI, torch's check of the
    CPU); elsewhere torch's 7-bit range (``reduce_range``), with which 16-bit pair sums cannot overflow.
    The 8 bits are used: the layer's result is nearer the float product than with 7."""
    assert compute_types.exact_int8_products() == torch.cpu._is_vnni_supported()
    inputs = torch.randn(16, 384, generator=torch.Generator().manual_seed(1))
    errors = {}
    for exact in (True, False):
        monkeypatch.setattr(compute_types, "exact_int8_products", lambda exact=exact: exact)
        layers = [m for m in _tiny_en(model_dir, "int8").decoder.modules()
                  if isinstance(m, compute_types.RowScaledInt8Linear)]
        assert {layer.reduce_range for layer in layers} == {not exact}
        layer = layers[0]
        with torch.no_grad():
            expected = torch.nn.functional.linear(inputs, layer.weight().dequantize(), layer.float_bias)
            errors[exact] = ((layer(inputs) - expected).norm() / expected.norm()).item()
    if torch.cpu._is_vnni_supported():  # 8-bit inputs on a CPU without VNNI could saturate: not run there
        assert errors[True] < 0.75 * errors[False], errors


@pytest.mark.parametrize(("asked", "device", "precision", "sequential", "runs"), [
    ("auto", "cpu", "auto", False, "int8"),
    ("auto", "cpu", "auto", True, "float32"),
    ("auto", "cuda", "auto", False, "float16"),
    ("auto", "cuda", "auto", True, "float16"),
    ("auto", "cpu", "full", False, "float32"),
    ("auto", "cpu", "half", False, "float16"),
    ("bfloat16", "cuda", "auto", False, "bfloat16"),
    ("float32", "cuda", "half", False, "float32"),
    ("int8", "cpu", "full", True, "int8"),
])
def test_what_each_compute_type_runs(asked: str, device: str, precision: str, sequential: bool, runs: str) -> None:
    """``auto`` is int8 for the CPU's batched path and float32 for openai-whisper's own (which the worker
    promises unchanged), float16 on CUDA, PRECISION's choice where it makes one; a named format is itself."""
    settings = Settings(whisper_compute_type=asked, precision=precision)
    assert compute_types.chosen(settings, device, None, sequential=sequential) == runs
    assert compute_types.chosen(Settings(precision=precision), device, asked, sequential=sequential) == runs


def test_int8_on_cuda_is_refused_naming_where_it_came_from() -> None:
    with pytest.raises(InvalidInput, match="compute_type: int8 runs on the CPU only") as raised:
        compute_types.chosen(Settings(), "cuda", "int8")
    assert raised.value.field == "compute_type"
    with pytest.raises(InvalidInput, match="WHISPER_COMPUTE_TYPE: int8 runs on the CPU only"):
        compute_types.chosen(Settings(whisper_compute_type="int8"), "cuda", None)


def test_every_format_but_auto_is_one_a_model_runs_in() -> None:
    assert set(compute_types.RUN_TYPES) == set(WHISPER_COMPUTE_TYPES) - {"auto"}
    assert {compute_types.activation_dtype(name) for name in compute_types.RUN_TYPES} == {
        torch.float32, torch.float16, torch.bfloat16}


def test_a_job_names_its_format_and_the_result_and_system_say_which_ran(make_fresh_worker, speech_wav: Path) -> None:
    """The default job on the CPU runs int8, a job may ask for float32 or bfloat16 (each a pool of its own,
    converted once), batch_size 1 runs float32 (whisper.transcribe's own); every result names its format,
    and ``system`` lists each loaded copy with it. An unknown format is refused naming the field."""
    worker = make_fresh_worker()
    converted: list[str] = []
    convert = compute_types.convert

    def counting(model: Any, compute_type: str) -> Any:
        converted.append(compute_type)
        return convert(model, compute_type)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compute_types, "convert", counting)
        results = {asked: run_job(worker, job(audio_base64=b64(speech_wav), **inputs)) for asked, inputs in [
            ("default", {}), ("float32", {"compute_type": "float32"}), ("bfloat16", {"compute_type": "bfloat16"}),
            ("again", {"compute_type": "int8"}), ("sequential", {"batch_size": 1})]}
    for result in results.values():
        assert "error" not in result, result
        assert media.recognised(result["transcription"]) >= 0.7, result["transcription"]
    assert {asked: result["compute_type"] for asked, result in results.items()} == {
        "default": "int8", "float32": "float32", "bfloat16": "bfloat16", "again": "int8", "sequential": "float32"}
    assert sorted(converted) == ["bfloat16", "float32", "int8"]  # each format once, kept for later jobs
    system = run_job(worker, {"id": "s", "input": {"task": "system"}})
    loaded = {(p["model"], p["dtype"]) for p in system["pipelines"] if p["task"] == "transcribe"}
    assert loaded == {("tiny.en", "int8"), ("tiny.en", "float32"), ("tiny.en", "bfloat16")}
    assert system["whisper_compute_type"] == "auto"
    refused = run_job(worker, job(audio_base64=b64(speech_wav), compute_type="int4"))
    assert refused["error_code"] == "INVALID_INPUT" and "compute_type" in refused["error"], refused


def test_the_pool_a_job_gets_is_the_one_preload_warms(make_fresh_worker) -> None:
    """get_pipelines without a format gives the pool of a job that names none: int8 for the CPU's batched
    default, float32 where WHISPER_BATCH_SIZE=1 makes openai-whisper's own path the default."""
    assert get_pipelines(make_fresh_worker().runtime, "tiny.en").first.compute_type == "int8"
    assert get_pipelines(make_fresh_worker(WHISPER_BATCH_SIZE="1").runtime, "tiny.en").first.compute_type == "float32"


def test_bfloat16_weights_on_the_cpu_hear_real_speech(model_dir: Path, real_speech: speech_corpus.Utterance) -> None:
    """bfloat16 (CUDA's other half format) runs on any device: the weights of linear layers and
    convolutions in bfloat16, activations too; its transcript of real speech stays near float32's."""
    model = _tiny_en(model_dir, "bfloat16")
    assert model.encoder.conv1.weight.dtype == torch.bfloat16 and model.decoder.ln.weight.dtype == torch.float32
    audio = real_speech.audio[: 30 * speech_corpus.SAMPLE_RATE]
    chunks = vad.speech_chunks(audio)
    found = decoding.transcribe_chunks(model, audio, chunks, options={"language": "en"}, dtype=torch.bfloat16)
    expected = decoding.transcribe_chunks(_tiny_en(model_dir), audio, chunks, options={"language": "en"})
    assert np.isfinite([segment["avg_logprob"] for segment in found["segments"]]).all()
    assert _wer(expected["text"], found["text"]) < 0.2, (expected["text"], found["text"])
