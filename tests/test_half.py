"""Every pipeline in the dtypes it runs in on CUDA, on the CPU: PRECISION=half takes the CUDA choices.

What CUDA runs: Whisper with fp16 activations (openai-whisper keeps fp32 weights and casts them per
layer), diffusion transformers and text encoders in bf16 with a video VAE in fp32 (latents cross
from one to the other), an image VAE in bf16, VITS in fp32, Silero VAD in fp32 on the CPU.

One thing CUDA runs cannot run on a CPU: ``whisper.transcribe`` itself turns fp16 off for a model
on the CPU (whisper/transcribe.py, "FP16 is not supported on CPU"). Its sequential path is tested
at the nearest point: the per-window calls it makes in fp16 (``whisper.decode`` and
``add_word_timestamps`` on an fp16 mel).
"""

from __future__ import annotations

import base64
import io
import subprocess
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import whisper
from whisper.tokenizer import get_tokenizer

from handler.app import Worker
from handler.pipelines.diffusion import loading
from handler.pipelines.speech import pipeline as speech
from handler.pipelines.whisper.pipeline import get_pipelines
from handler.runtime.registry import Registry
from testkit import media
from tests.conftest import job, run_job, worker_settings


@contextmanager
def output_dtypes(module: torch.nn.Module) -> Iterator[list[torch.dtype]]:
    """The dtypes of ``module``'s outputs while the block runs."""
    seen: list[torch.dtype] = []
    def record(_module: torch.nn.Module, _args: Any, out: Any) -> None:
        seen.append((out[0] if isinstance(out, tuple) else out).dtype)

    hook = module.register_forward_hook(record)
    try:
        yield seen
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def half_worker(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, tiny_vits: Path, tiny_sd: Path,
                tiny_wan: Path) -> Worker:
    """One half-precision worker for the module, with a registry of its own (the suite's shared one
    holds fp32 pipelines): each model loads once, in the dtypes PRECISION=half gives it."""
    work = tmp_path_factory.mktemp("half") / "jobs"
    work.mkdir()
    settings = worker_settings(model_dir, work, PRECISION="half", TTS_MODEL=str(tiny_vits),
                               IMAGE_MODEL=str(tiny_sd), VIDEO_MODEL=str(tiny_wan))
    return Worker(settings, registry=Registry(load_wait_timeout=120))


def whisper_pipeline(worker) -> Any:
    return get_pipelines(worker.runtime, "tiny.en").first


def test_vad_chunks_feed_fp16_decoding_through_the_handler(half_worker, speech_wav: Path) -> None:
    """A transcription job with VAD on a half-precision worker: Silero (fp32, CPU) cuts, the shared
    batch decodes in fp16, with word timings, and still hears the sentences (real tiny.en)."""
    pipeline = whisper_pipeline(half_worker)
    with output_dtypes(pipeline.model.encoder) as seen:
        result = run_job(half_worker, job(audio_base64=base64.b64encode(speech_wav.read_bytes()).decode(),
                                          enable_vad=True, batch_size=4, temperature=0.0))
    assert "error" not in result, result
    assert seen and set(seen) == {torch.float16}
    assert media.recognised(result["transcription"]) >= 0.8, result


def test_sequential_whisper_window_calls_run_in_fp16(half_worker, speech_wav: Path) -> None:
    """What whisper.transcribe does per window on CUDA, on an fp16 mel, with the real tiny.en
    weights: decode (which still hears the sentences), then word timings."""
    pipeline = whisper_pipeline(half_worker)
    model = pipeline.model
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(str(speech_wav)))).half()
    options = whisper.DecodingOptions(language="en", fp16=True, temperature=0.0)
    with output_dtypes(model.decoder.blocks[-1]) as seen:  # the decoder returns fp32 logits
        result = whisper.decode(model, mel, options)
    assert set(seen) == {torch.float16}
    assert media.recognised(result.text) >= 0.8, result.text
    tokenizer = get_tokenizer(False, num_languages=model.num_languages, language="en", task="transcribe")
    segments = [{"tokens": [t for t in result.tokens if t < tokenizer.eot], "start": 0.0, "end": 30.0, "seek": 0}]
    whisper.timing.add_word_timestamps(segments=segments, model=model, tokenizer=tokenizer, mel=mel,
                                       num_frames=mel.shape[-1], last_speech_timestamp=0.0)
    words = segments[0]["words"]
    assert len(words) >= 8 and all(0 <= w["start"] <= w["end"] <= 30 for w in words)


def batched_alignment(device: str) -> tuple[list[torch.dtype], list[dict[str, Any]]]:
    """Batched fp16 decoding with word timings of 20 s on ``device``: the dtypes the encoder was
    given (decoding, then each window's alignment pass) and the words timed. A random
    tiny.en-shaped model decodes a fixed 24 tokens a window (bench.gpu.fixed_tokens), so there are
    words to time whatever it hears."""
    from whisper.model import ModelDimensions, Whisper

    from bench.gpu import TINY_EN_DIMS, fixed_tokens
    from handler.pipelines.whisper import decoding
    from handler.pipelines.whisper.options import DecodeOptions
    from handler.pipelines.whisper.vad import Chunk
    from handler.pipelines.whisper.windows import prepare_windows

    torch.manual_seed(0)
    model = Whisper(ModelDimensions(**TINY_EN_DIMS))
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    model = model.to(device)
    audio = np.random.default_rng(0).normal(0, 0.05, 16000 * 20).astype(np.float32)
    inputs = prepare_windows(model, audio, [Chunk(0, len(audio))])
    settings = DecodeOptions.from_options(
        model, {"temperature": 0.0, "language": "en", "word_timestamps": True}, dtype=torch.float16)
    seen: list[torch.dtype] = []
    hook = model.encoder.register_forward_pre_hook(lambda _module, args: seen.append(args[0].dtype))
    try:
        with fixed_tokens(24):
            found = decoding.decode_windows(model, inputs, settings)
    finally:
        hook.remove()
    return seen, [word for segment in found[0] for word in segment.get("words", [])]


def test_batched_fp16_word_timings_align_on_the_fp16_mel() -> None:
    """whisper.timing's alignment runs the whole model on the window's mel: in the batched path
    that is the fp16 mel the window was decoded on, as whisper.transcribe does (not the fp32 one
    the window was prepared as), so on CUDA the alignment runs in the decoder's dtype."""
    seen, words = batched_alignment("cpu")
    assert words
    assert len(seen) >= 2 and set(seen) == {torch.float16}, seen
    assert all(0 <= w["start"] <= w["end"] <= 20 and np.isfinite([w["start"], w["end"]]).all() for w in words)


def test_sequential_path_on_the_cpu_asks_for_fp32(half_worker, speech_wav: Path) -> None:
    """On the CPU the worker does not ask whisper.transcribe for the fp16 it would refuse with a
    warning (the suite turns warnings into errors, so asking would fail here)."""
    result = run_job(half_worker, job(audio_base64=base64.b64encode(speech_wav.read_bytes()).decode(),
                                      batch_size=1, word_timestamps=True, temperature=0.0))
    assert "error" not in result, result
    assert media.recognised(result["transcription"]) >= 0.8


def test_speech_stays_fp32_and_makes_a_wav(half_worker) -> None:
    """VITS runs in fp32 on every device (bf16 breaks its spline flow: "Discriminant has negative
    values" on the tiny model); the WAV decodes and is not silent."""
    result = run_job(half_worker, job(task="speech", text="hello there, how are you", seed=3))
    assert "error" not in result, result
    data = base64.b64decode(result["files"][0]["base64"])
    with wave.open(io.BytesIO(data)) as wav:
        samples = np.frombuffer(wav.readframes(wav.getnframes()), np.int16)
    assert samples.size > 1000 and np.abs(samples).max() > 0
    model = speech.get_pipelines(half_worker.runtime, half_worker.runtime.settings.tts_model).first.model
    assert next(model.parameters()).dtype == torch.float32


def test_text2image_runs_in_bf16(half_worker, tmp_path: Path) -> None:
    """The UNet, text encoder and VAE in bf16; the PNG decodes at the asked size with varied pixels."""
    from PIL import Image

    result = run_job(half_worker, job(task="text2image", prompt="a red house", width=64, height=64,
                                      num_inference_steps=2, seed=1))
    assert "error" not in result, result
    image = Image.open(io.BytesIO(base64.b64decode(result["files"][0]["base64"])))
    image.load()
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 0
    pipeline = loading.pipelines(half_worker.runtime, "text2image", str(half_worker.runtime.settings.image_model)
                                   ).first
    assert {pipeline.unet.dtype, pipeline.vae.dtype, pipeline.text_encoder.dtype} == {torch.bfloat16}


def probe_video(result: dict, target: Path) -> tuple[int, int, int]:
    files = {f["name"]: f for f in result["files"]}
    target.write_bytes(base64.b64decode(files["video.mp4"]["base64"]))
    done = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
                           "stream=width,height,nb_read_frames", "-of", "csv=p=0", str(target)],
                          capture_output=True, check=True, text=True)
    width, height, frames = (int(part) for part in done.stdout.strip().split(","))
    return width, height, frames


def video_pipeline(worker, model: Path) -> Any:
    return loading.pipelines(worker.runtime, "text2video", str(model), video=True).first


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_text2video_bf16_transformer_fp32_vae(half_worker, make_fresh_worker, tiny_wan: Path, tiny_ltx: Path,
                                              tmp_path: Path, family: str) -> None:
    """Wan and LTX: transformer and text encoder in bf16, the VAE in fp32; the latents cross
    between them and the mp4 decodes with the planned frames."""
    model = tiny_wan if family == "wan" else tiny_ltx
    worker = half_worker if family == "wan" else make_fresh_worker(PRECISION="half", VIDEO_MODEL=str(model))
    pipeline = video_pipeline(worker, model)
    assert (pipeline.transformer.dtype, pipeline.text_encoder.dtype, pipeline.vae.dtype) == (
        torch.bfloat16, torch.bfloat16, torch.float32)
    with output_dtypes(pipeline.transformer) as seen:
        result = run_job(worker, job(task="text2video", prompt="a red boat", width=64, height=64, fps=8,
                                     duration_s=1.0, num_inference_steps=2, seed=2))
    assert "error" not in result, result
    assert seen == [torch.bfloat16] * len(seen) and seen
    width, height, frames = probe_video(result, tmp_path / "v.mp4")
    assert (width, height) == (result["width"], result["height"]) and frames == result["frames"]


def test_captioned_video_on_a_half_worker(half_worker, tmp_path: Path) -> None:
    """Captions (real tiny.en word timings of espeak speech) on a bf16 Wan clip narrated by that
    speech: a subtitle file comes back and the mp4 decodes."""
    speech_wav = media.speak("hello world", tmp_path / "hello.wav", speed=200)
    result = run_job(half_worker, job(task="text2video", prompt="a red boat", width=64, height=64, fps=4,
                                      duration_s=1.0, num_inference_steps=2, seed=2, captions="soft",
                                      audio_base64=base64.b64encode(speech_wav.read_bytes()).decode()))
    assert "error" not in result, result
    assert {f["name"] for f in result["files"]} >= {"video.mp4", "captions.srt"}
    probe_video(result, tmp_path / "v.mp4")


def test_full_precision_keeps_fp32_on_the_cpu(make_fresh_worker, tiny_wan: Path) -> None:
    """The default (auto) on a CPU is fp32 for the diffusion models and int8 for batched Whisper (its
    WHISPER_COMPUTE_TYPE); the half-precision runs above are the setting's."""
    worker = make_fresh_worker(VIDEO_MODEL=str(tiny_wan))
    assert whisper_pipeline(worker).compute_type == "int8"
    pipeline = video_pipeline(worker, tiny_wan)
    assert {pipeline.transformer.dtype, pipeline.vae.dtype} == {torch.float32}
