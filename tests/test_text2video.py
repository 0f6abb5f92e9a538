"""`text2video` on tiny random-weight Wan and LTX pipelines, checked with ffprobe on the real mp4."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from handler.pipelines.diffusion.video_plan import FAMILIES, frame_size
from testkit import media
from testkit.jobserver import JobServer
from tests.conftest import assert_no_job_dirs, b64, job, run_job, start_worker, stop_worker


def save_video(result: dict, target: Path) -> Path:
    files = {f["name"]: f for f in result["files"]}
    target.write_bytes(base64.b64decode(files["video.mp4"]["base64"]))
    return target


def probe(path: Path) -> dict:
    done = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
                          capture_output=True, check=True)
    return json.loads(done.stdout)


def streams(info: dict, kind: str) -> list[dict]:
    return [s for s in info["streams"] if s["codec_type"] == kind]


def frame_at(path: Path, seconds: float, size: tuple[int, int]) -> np.ndarray:
    done = subprocess.run(["ffmpeg", "-v", "error", "-ss", f"{seconds:.3f}", "-i", str(path), "-frames:v", "1",
                           "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True)
    return np.frombuffer(done.stdout, np.uint8).reshape(size[1], size[0], 3).astype(np.int16)


def all_frames(path: Path) -> bytes:
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                          capture_output=True, check=True).stdout


@pytest.fixture
def wan_worker(make_worker, tiny_wan: Path, tiny_vits: Path):
    return make_worker(VIDEO_MODEL=str(tiny_wan), TTS_MODEL=str(tiny_vits))


def video_job(**inputs: object) -> dict:
    base = {"task": "text2video", "prompt": "a red boat on the sea", "resolution": "144p", "fps": 8,
            "duration_s": 1.5, "num_inference_steps": 2, "seed": 4}
    return job(**{**base, **inputs})


@pytest.mark.parametrize("aspect", ["16:9", "9:16", "1:1", "4:3", "3:4"])
def test_each_aspect_ratio(wan_worker, work_dir: Path, tmp_path: Path, aspect: str) -> None:
    """The mp4 has the derived size, the asked fps, and the asked duration within one frame; plus a poster."""
    result = run_job(wan_worker, video_job(aspect_ratio=aspect))
    assert "error" not in result, result
    info = probe(save_video(result, tmp_path / "v.mp4"))
    (video,) = streams(info, "video")
    width, height = frame_size(aspect, "144p", FAMILIES["wan"])  # type: ignore[arg-type]
    assert (video["width"], video["height"]) == (width, height) == (result["width"], result["height"])
    assert video["codec_name"] == "h264" and video["r_frame_rate"] == "8/1"
    assert abs(float(info["format"]["duration"]) - 1.5) <= 1 / 8
    assert streams(info, "audio") == []
    names = {f["name"] for f in result["files"]}
    assert names == {"video.mp4", "poster.jpg"}
    assert (height > width) == (aspect in ("9:16", "3:4"))
    assert_no_job_dirs(work_dir)


def test_ltx_sizes_and_frames(make_worker, tiny_ltx: Path, tmp_path: Path) -> None:
    """LTX-Video: sides are multiples of 32 and the clip is made of 8n+1 generated frames."""
    worker = make_worker(VIDEO_MODEL=str(tiny_ltx))
    result = run_job(worker, video_job(aspect_ratio="16:9"))
    assert "error" not in result, result
    (video,) = streams(probe(save_video(result, tmp_path / "v.mp4")), "video")
    assert video["width"] % 32 == 0 and video["height"] % 32 == 0
    assert all((frames - 1) % 8 == 0 for frames in result["segment_frames"])
    assert int(video["nb_frames"]) == result["frames"] == 12


def test_long_video_is_built_from_segments(make_worker, tiny_wan: Path, tmp_path: Path) -> None:
    """A 5 s request with 17-frame clips generates 3 segments and is 5 s long at the asked fps (not slowed)."""
    worker = make_worker(VIDEO_MODEL=str(tiny_wan), VIDEO_CLIP_FRAMES="17")
    result = run_job(worker, video_job(duration_s=5.0))
    assert result["segments"] == 3 and len(result["segment_frames"]) == 3
    info = probe(save_video(result, tmp_path / "v.mp4"))
    (video,) = streams(info, "video")
    assert video["r_frame_rate"] == "8/1" and int(video["nb_frames"]) == 40
    assert abs(float(info["format"]["duration"]) - 5.0) <= 1 / 8


def test_seed_decides_the_frames(wan_worker, tmp_path: Path) -> None:
    """Same seed and input: the same frames; another seed: different frames."""
    first = all_frames(save_video(run_job(wan_worker, video_job(seed=1)), tmp_path / "a.mp4"))
    again = all_frames(save_video(run_job(wan_worker, video_job(seed=1)), tmp_path / "b.mp4"))
    other = all_frames(save_video(run_job(wan_worker, video_job(seed=2)), tmp_path / "c.mp4"))
    assert first == again
    assert first != other


@pytest.mark.slow
def test_narration_from_speech_with_soft_captions(wan_worker, speech_wav: Path, tmp_path: Path) -> None:
    """espeak speech as `audio` with soft captions: AAC and a subtitle stream whose text has the spoken words;
    the video runs as long as the speech."""
    result = run_job(wan_worker, video_job(audio_base64=b64(speech_wav), captions="soft"))
    assert "error" not in result, result
    path = save_video(result, tmp_path / "v.mp4")
    info = probe(path)
    assert [s["codec_name"] for s in streams(info, "audio")] == ["aac"]
    assert [s["codec_name"] for s in streams(info, "subtitle")] == ["mov_text"]
    speech_s = float(probe(speech_wav)["format"]["duration"])
    assert float(info["format"]["duration"]) >= speech_s - 0.05
    text = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:s:0", "-f", "srt", "-"],
                          capture_output=True, check=True, text=True).stdout
    assert media.recognised(text) >= 0.5, text
    files = {f["name"] for f in result["files"]}
    assert files == {"video.mp4", "poster.jpg", "captions.srt"}


def test_narration_text_is_spoken(wan_worker, tmp_path: Path) -> None:
    """`narration` text is synthesised by the speech task and muxed as AAC."""
    result = run_job(wan_worker, video_job(narration="A boat sails on the sea. The sky is blue."))
    assert result["narrated"] is True
    info = probe(save_video(result, tmp_path / "v.mp4"))
    assert [s["codec_name"] for s in streams(info, "audio")] == ["aac"]


@pytest.mark.slow
def test_burned_captions_change_the_frames(wan_worker, speech_wav: Path, tmp_path: Path) -> None:
    """Burned captions draw text into the frames: compared with the same render without captions,
    frames differ where a caption is shown."""
    plain = save_video(run_job(wan_worker, video_job(audio_base64=b64(speech_wav))), tmp_path / "plain.mp4")
    burned_result = run_job(wan_worker, video_job(audio_base64=b64(speech_wav), captions="burned"))
    burned = save_video(burned_result, tmp_path / "burned.mp4")
    assert streams(probe(burned), "subtitle") == []
    size = (burned_result["width"], burned_result["height"])
    difference = np.abs(frame_at(plain, 1.0, size) - frame_at(burned, 1.0, size)).mean()
    assert difference > 1.0, difference


@pytest.mark.parametrize(
    ("inputs", "env", "code", "field"),
    [
        ({"duration_s": 600.0}, {}, "INPUT_TOO_LARGE", "duration_s"),
        ({"resolution": "1080p"}, {"MAX_IMAGE_PIXELS": str(640 * 480)}, "INPUT_TOO_LARGE", "resolution"),
        ({"num_inference_steps": 500}, {}, "INPUT_TOO_LARGE", "num_inference_steps"),
        ({"fps": 60, "duration_s": 50.0}, {"MAX_VIDEO_FRAMES": "100"}, "INPUT_TOO_LARGE", "duration_s"),
        ({"narration": "hi", "audio": "https://example.com/a.mp3"}, {}, "INVALID_INPUT", None),
        ({"captions": "soft"}, {}, "INVALID_INPUT", None),
        ({"aspect_ratio": "2:1"}, {}, "INVALID_INPUT", "aspect_ratio"),
        ({"narration": "x" * 100}, {"MAX_SPEECH_CHARS": "10"}, "INPUT_TOO_LARGE", "narration"),
    ],
)
def test_refused_before_any_pipeline_loads(make_fresh_worker, tiny_wan: Path, tiny_vits: Path, work_dir: Path,
                                           inputs: dict, env: dict, code: str, field: str | None) -> None:
    """Over-limit and impossible requests get their code before any model is loaded (a registry of
    its own shows it)."""
    worker = make_fresh_worker(VIDEO_MODEL=str(tiny_wan), TTS_MODEL=str(tiny_vits), **env)
    result = run_job(worker, video_job(**inputs))
    assert result["error_code"] == code, result
    if field:
        assert result["field"] == field
    assert worker.runtime.registry.loaded() == {}
    assert_no_job_dirs(work_dir)


def test_limits_come_before_the_model_is_even_read(make_fresh_worker, tmp_path: Path, work_dir: Path) -> None:
    """On a worker whose video model is missing, a request over the limits is INPUT_TOO_LARGE (not
    MODEL_LOAD_FAILED): the limits are checked before model_index.json is read."""
    worker = make_fresh_worker(VIDEO_MODEL=str(tmp_path / "no-such-model"))
    result = run_job(worker, video_job(duration_s=10_000.0))
    assert (result["error_code"], result["field"]) == ("INPUT_TOO_LARGE", "duration_s"), result
    missing = run_job(worker, video_job(duration_s=1.0))
    assert missing["error_code"] == "MODEL_LOAD_FAILED" and "huggingface" not in missing["error"]


def test_oversized_narration_names_its_own_field(make_worker, tiny_wan: Path, speech_wav: Path) -> None:
    """A narration given as audio_base64 that is longer than the video limit is reported on
    audio_base64, the field the client sent."""
    worker = make_worker(VIDEO_MODEL=str(tiny_wan), MAX_VIDEO_DURATION_S="1")
    result = run_job(worker, video_job(duration_s=0.5, audio_base64=b64(speech_wav)))
    assert (result["error_code"], result["field"]) == ("INPUT_TOO_LARGE", "audio_base64"), result


def test_unsupported_model_class_is_refused(make_worker, tiny_sd: Path) -> None:
    """A diffusers pipeline that is not a video model is INVALID_INPUT, found from its config alone."""
    result = run_job(make_worker(VIDEO_MODEL=str(tiny_sd)), video_job())
    assert result["error_code"] == "INVALID_INPUT" and result["field"] == "model"


@pytest.mark.integration
@pytest.mark.slow
def test_outputs_in_the_bucket_and_progress_on_the_job_server(tiny_wan: Path, model_dir: Path, tmp_path: Path,
                                                             bucket_env: dict, speech_wav: Path) -> None:
    """Through the real worker loop: progress arrives per segment and step, and the mp4, poster and
    captions land in the bucket and download through their presigned URLs."""
    with JobServer() as server:
        worker = start_worker(server, tmp_path, model_dir, VIDEO_MODEL=str(tiny_wan), VIDEO_CLIP_FRAMES="17",
                              **bucket_env)
        try:
            inputs = {"task": "text2video", "prompt": "a tree", "width": 64, "height": 64, "fps": 8, "duration_s": 5.0,
                      "num_inference_steps": 3, "seed": 9, "audio_base64": b64(speech_wav), "captions": "soft"}
            server.submit("film", inputs)
            assert server.wait_for(1, 180)
            body = server.result("film")
            assert "error" not in body, body
            messages = server.progress.get("film", [])
            count = body["output"]["segments"]
            assert count == 4  # the 7.9 s narration outlasts the 5 s asked for: more segments, speech not cut
            assert messages and messages[-1] == f"segment {count}/{count}, step 3/3", messages
            # Each segment's last step is always reported; the ones between are throttled to ~1/s.
            assert {f"segment {i}/{count}, step 3/3" for i in range(1, count + 1)} <= set(messages)
            for stored in body["output"]["files"]:
                with urllib.request.urlopen(stored["url"], timeout=10) as response:  # noqa: S310 (loopback)
                    assert len(response.read()) == stored["size"]
            assert {f["name"] for f in body["output"]["files"]} == {"video.mp4", "poster.jpg", "captions.srt"}
            assert worker.job_dirs() == []
        finally:
            stop_worker(worker)


@pytest.mark.parametrize(
    ("inputs", "code", "field"),
    [({"width": 200, "height": 112}, "INVALID_INPUT", "width"),  # 200 is not a multiple of 16
     ({"width": 128}, "INVALID_INPUT", None),
     ({"width": 128, "height": 64, "aspect_ratio": "1:1"}, "INVALID_INPUT", None),
     ({"width": 4096, "height": 4096}, "INPUT_TOO_LARGE", "width")],
)
def test_explicit_size_is_checked(wan_worker, inputs: dict, code: str, field: str | None) -> None:
    """width/height replace aspect_ratio + resolution: both or neither, never with them, each a
    multiple of the family's, within the pixel limit."""
    result = run_job(wan_worker, video_job(resolution=None, **inputs))
    assert result["error_code"] == code, result
    if field:
        assert result["field"] == field


def test_explicit_size_and_nulls(wan_worker) -> None:
    """An explicit 96x64 (multiples of 16) is generated as asked; null optional fields mean "not given"."""
    result = run_job(wan_worker, video_job(width=96, height=64, resolution=None, seed=None, negative_prompt=None,
                                           guidance_scale=None))
    assert "error" not in result, result
    assert (result["width"], result["height"]) == (96, 64)
