"""`text2image` on a tiny random-weight Stable Diffusion pipeline, loaded through the production path."""

from __future__ import annotations

import base64
import io
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from handler.tasks.text2image import ImageInput
from testkit.jobserver import JobServer
from tests.conftest import assert_no_job_dirs, job, run_job, start_worker, stop_worker


def images_of(result: dict) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(f["base64"]))) for f in result["files"]]


@pytest.fixture
def painter(make_worker, tiny_sd: Path):
    return make_worker(IMAGE_MODEL=str(tiny_sd))


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_images_in_each_format(painter, work_dir: Path, fmt: str, pil_format: str) -> None:
    """Two 64x80 images come back in the asked format, with the seed and size used."""
    result = run_job(painter, job(task="text2image", prompt="a red cat", width=64, height=80, num_images=2,
                                  steps=2, seed=5, format=fmt))
    assert "error" not in result, result
    images = images_of(result)
    assert [(i.format, i.size) for i in images] == [(pil_format, (64, 80))] * 2
    assert (result["width"], result["height"], result["seed"], result["num_images"]) == (64, 80, 5, 2)
    assert_no_job_dirs(work_dir)


def test_model_default_size(painter) -> None:
    """Without width/height the model's own size is used (sample size x VAE factor)."""
    result = run_job(painter, job(task="text2image", prompt="a cat", steps=1, seed=1))
    assert images_of(result)[0].size == (64, 64)


def test_seed_decides_the_pixels(painter) -> None:
    """Same seed and input: the same pixels; another seed: different pixels."""
    def pixels(seed: int) -> np.ndarray:
        result = run_job(painter, job(task="text2image", prompt="a blue house", width=64, height=64, steps=2,
                                      seed=seed))
        return np.asarray(images_of(result)[0])

    first, again, other = pixels(11), pixels(11), pixels(12)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(
    ("inputs", "code", "field"),
    [
        ({"num_images": 9}, "INPUT_TOO_LARGE", "num_images"),
        ({"steps": 1000}, "INPUT_TOO_LARGE", "num_inference_steps"),
        ({"num_inference_steps": 1000}, "INPUT_TOO_LARGE", "num_inference_steps"),
        ({"scheduler": "K_EULER"}, "INVALID_INPUT", "scheduler"),
        ({"image_url": "https://example.com/a.png", "strength": 0.3}, "INVALID_INPUT", "strength"),
        ({"width": 4096, "height": 4096}, "INPUT_TOO_LARGE", "width"),
        ({"model": "someone/else"}, "INVALID_INPUT", "model"),
    ],
)
def test_limits_are_checked_before_loading(make_fresh_worker, tiny_sd: Path, inputs: dict, code: str,
                                           field: str) -> None:
    """Over-limit requests are refused before the pipeline is loaded (a registry of its own shows it)."""
    worker = make_fresh_worker(IMAGE_MODEL=str(tiny_sd), MAX_IMAGE_PIXELS=str(1024 * 1024))
    result = run_job(worker, job(task="text2image", prompt="x", **inputs))
    assert result["error_code"] == code and result["field"] == field
    assert worker.runtime.registry.loaded() == {}


def test_sizes_must_fit_the_model(painter) -> None:
    """A width the VAE cannot divide is INVALID_INPUT naming the multiple."""
    result = run_job(painter, job(task="text2image", prompt="x", width=66, height=64, steps=1))
    assert result["error_code"] == "INVALID_INPUT" and result["field"] == "width"
    assert "multiple of 8" in result["error"]


def test_images_land_in_the_bucket(make_worker, tiny_sd: Path, bucket_env: dict) -> None:
    """With a bucket, images are uploaded and download through their presigned URLs."""
    worker = make_worker(IMAGE_MODEL=str(tiny_sd), **bucket_env)
    result = run_job(worker, job(task="text2image", prompt="a tree", width=64, height=64, steps=1, seed=3))
    (stored,) = result["files"]
    assert stored["url"].startswith("http://127.0.0.1:")
    with urllib.request.urlopen(stored["url"], timeout=10) as response:  # noqa: S310 (loopback test server)
        body = response.read()
    assert len(body) == stored["size"]
    assert Image.open(io.BytesIO(body)).size == (64, 64)


@pytest.mark.integration
@pytest.mark.slow
def test_progress_reaches_the_job_server(tiny_sd: Path, model_dir: Path, tmp_path: Path) -> None:
    """Through the real worker loop, step progress arrives on the job server while the job runs."""
    with JobServer() as server:
        worker = start_worker(server, tmp_path, model_dir, IMAGE_MODEL=str(tiny_sd))
        try:
            server.submit("paint", {"task": "text2image", "prompt": "a boat", "width": 64, "height": 64,
                                    "steps": 4, "seed": 2})
            assert server.wait_for(1, 120)
            assert "error" not in server.result("paint"), server.result("paint")
            assert server.progress.get("paint"), "no progress update arrived"
            assert server.progress["paint"][-1] == "step 4/4"
        finally:
            stop_worker(worker)


SDXL_TEST_INPUT = {  # runpod-workers/worker-sdxl's test_input.json, verbatim
    "prompt": "A majestic steampunk dragon soaring through a cloudy sky, intricate clockwork details, golden hour "
              "lighting, highly detailed",
    "negative_prompt": "blurry, low quality, deformed, ugly, text, watermark, signature",
    "height": 1024, "width": 1024, "num_inference_steps": 25, "refiner_inference_steps": 50, "guidance_scale": 7.5,
    "strength": 0.3, "high_noise_frac": 0.8, "seed": 42, "scheduler": "K_EULER", "num_images": 1, "image_url": None,
}
JOBS_DOC = (Path(__file__).resolve().parents[1] / "docs" / "jobs.md").read_text()


def test_worker_sdxl_clients_are_refused_only_on_listed_fields(painter) -> None:
    """worker-sdxl's own test input is refused only on a field docs/jobs.md lists as unsupported, naming
    it; without those fields (null is "not given") the same request completes with the same vocabulary
    (at 64x64 and 2 steps: the tiny CPU model would take minutes at 1024x1024)."""
    refused = run_job(painter, job(task="text2image", **SDXL_TEST_INPUT))
    assert refused["error_code"] == "INVALID_INPUT", refused
    assert refused["field"] in ImageInput.unsupported and "not supported by this worker" in refused["error"]
    for name in ImageInput.unsupported:
        assert f"`{name}`" in JOBS_DOC
    supported = {k: (None if k in ImageInput.unsupported else v) for k, v in SDXL_TEST_INPUT.items()}
    done = run_job(painter, job(task="text2image", **{**supported, "width": 64, "height": 64,
                                                      "num_inference_steps": 2}))
    assert "error" not in done, done
    assert (done["width"], done["height"], done["num_inference_steps"], done["seed"]) == (64, 64, 2, 42)
