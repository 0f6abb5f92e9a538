"""GPU memory as a managed resource: pipelines placed under a budget, idle ones parked or dropped least
recently used first, held ones never moved, jobs waiting for room with the gate's timeout and
cancellation, requests that could never fit refused before any work."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from handler.app import Worker
from handler.cancel import CancelToken
from handler.errors import Cancelled, GenerationTimeout, InputTooLarge
from handler.runtime.instances import InstancePool, Placement, move_whole
from handler.runtime.registry import PipelineKey, Registry
from handler.runtime.residency import Residency
from testkit.fixture_tasks import TABLE, FixturePipeline
from tests.conftest import assert_no_job_dirs

MB = 2**20


class Weights:
    """A pipeline instance that only knows where it is."""

    def __init__(self) -> None:
        self.device = "cpu"
        self.moves: list[str] = []

    def to(self, device: str) -> None:
        self.device = device
        self.moves.append(device)


def pool(name: str, megabytes: int) -> InstancePool[Weights]:
    made = InstancePool([Weights()], Placement(weights=megabytes * MB, move=move_whole))
    made.key = PipelineKey(name, name, "cuda", "float16")
    return made


def residency(budget_mb: int, *, host_mb: int = 10**6, **hooks: Any) -> Residency:
    return Residency(device="cuda", budget=budget_mb * MB, host_reserve=0, host_room=lambda: host_mb * MB, **hooks)


def use(memory: Residency, *pools: InstancePool[Any], working_mb: int = 0) -> None:
    for each in pools:
        with memory.hold(each, working=working_mb * MB, timeout=1):
            assert each.first.device == "cuda"


def test_idle_pipelines_leave_least_recently_used_first() -> None:
    """On a budget of two: the third pipeline parks the least recently used, and a parked one comes
    back (a move, not a load) parking the next least recently used."""
    memory = residency(100)
    a, b, c = pool("a", 40), pool("b", 40), pool("c", 40)
    use(memory, a, b, c)
    assert memory.places() == {("a", "a"): "parked", ("b", "b"): "device", ("c", "c"): "device"}
    assert a.first.device == "cpu"
    use(memory, b, a)  # b is now the most recent of the two on the device, so c leaves
    assert memory.places() == {("a", "a"): "device", ("b", "b"): "device", ("c", "c"): "parked"}
    assert a.first.moves == ["cuda", "cpu", "cuda"]
    assert memory.moves.counts == {("a", "to_device"): 2, ("b", "to_device"): 1, ("c", "to_device"): 1,
                                   ("a", "park"): 1, ("c", "park"): 1}


def test_working_memory_counts_while_held() -> None:
    """A job's working memory is counted beside the weights while it runs, and makes room like
    weights do; once it ends, nothing more has to leave."""
    memory = residency(100)
    a, b = pool("a", 30), pool("b", 30)
    use(memory, a)
    use(memory, b, working_mb=50)  # 30 + 30 + 50 > 100: a leaves
    assert memory.places()[("a", "a")] == "parked"
    assert memory.used() == 30 * MB
    use(memory, a, working_mb=10)  # 30 + 30 + 10 fits: b stays
    assert set(memory.places().values()) == {"device"}


def test_a_dropped_pipeline_is_forgotten_and_taken_back_if_still_in_hand() -> None:
    """With no host RAM to spare, an idle pipeline leaving the device is dropped: moved off the
    device, forgotten by the registry; a job that still had it comes back with it, and it is adopted."""
    forgotten: list[Any] = []
    adopted: list[Any] = []
    memory = residency(50, host_mb=0, forget=lambda key, p: forgotten.append(p),
                       adopt=lambda key, p: adopted.append(p))
    a, b = pool("a", 40), pool("b", 40)
    use(memory, a, b)
    assert forgotten == [a] and a.first.device == "cpu"
    assert memory.places() == {("a", "a"): "dropped", ("b", "b"): "device"}
    assert memory.moves.counts[("a", "drop")] == 1
    use(memory, a)
    assert adopted == [a] and forgotten == [a, b]
    assert memory.places() == {("a", "a"): "device", ("b", "b"): "dropped"}


def test_a_held_pipeline_is_never_moved_and_the_other_job_waits() -> None:
    """While one job holds a pipeline, another that needs its room waits (it is not moved under the
    first job), and gets the room as soon as the first ends."""
    memory = residency(100)
    a, b = pool("a", 60), pool("b", 60)
    released = threading.Event()
    got_room_at: list[float] = []

    def second() -> None:
        with memory.hold(b, timeout=5):
            got_room_at.append(time.monotonic())

    with memory.hold(a, timeout=1):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.3)
        assert got_room_at == [] and a.first.moves == ["cuda"]
        ended = time.monotonic()
        released.set()
    waiter.join(5)
    assert got_room_at and got_room_at[0] >= ended
    assert a.first.moves == ["cuda", "cpu"]


def test_no_room_within_the_timeout_is_timeout_and_a_cancelled_wait_is_cancelled() -> None:
    """Waiting for room is bounded by the acquire timeout (TIMEOUT) and left at once when the job is
    cancelled (CANCELLED); neither leaves anything counted."""
    memory = residency(100)
    a, b = pool("a", 60), pool("b", 60)
    with memory.hold(a, timeout=1):
        started = time.monotonic()
        with pytest.raises(GenerationTimeout, match="no room on the GPU"), memory.hold(b, timeout=0.3):
            pass
        assert time.monotonic() - started == pytest.approx(0.3, abs=0.2)
        token = CancelToken()
        threading.Timer(0.2, token.cancel).start()
        started = time.monotonic()
        with pytest.raises(Cancelled), memory.hold(b, timeout=30, cancel=token):
            pass
        assert time.monotonic() - started < 1.0
    assert memory.used() == 60 * MB
    assert memory.places() == {("a", "a"): "device", ("b", "b"): "parked"}
    use(memory, b)


def test_a_request_that_could_never_fit_is_input_too_large() -> None:
    """Weights and working memory over the whole budget: INPUT_TOO_LARGE naming the field, without
    waiting and without moving anything."""
    memory = residency(100)
    a = pool("a", 60)
    with pytest.raises(InputTooLarge, match="budget") as info:
        memory.check_fits(120 * MB, field="resolution", what="a segment of 81 frames of 832x480")
    assert info.value.field == "resolution"
    with pytest.raises(InputTooLarge), memory.hold(a, working=50 * MB, timeout=5):
        pass
    assert a.first.moves == []


def test_without_a_budget_nothing_leaves() -> None:
    """No budget (the CPU, GPU_MEMORY_BUDGET_MB unset): places are tracked, nothing is parked."""
    memory = Residency(device="cpu", budget=None)
    pools = [pool(name, 10**6) for name in "abc"]
    use_cpu = [memory.hold(each, timeout=1) for each in pools]
    for held in use_cpu:
        with held:
            pass
    assert set(memory.places().values()) == {"device"}


# The same policy through the worker: jobs of the fixture task whose model declares its weights.


def fixture_job(**inputs: object) -> dict[str, object]:
    return {"id": "residency", "input": {"task": "fixture", **inputs}}


@pytest.fixture
def make_budget_worker(make_settings):
    def make(**env: str) -> Worker:
        settings = make_settings(GPU_MEMORY_BUDGET_MB="100", MAX_CONCURRENT_GENERATIONS="2", **env)
        return Worker(settings, tasks=TABLE, registry=Registry())

    return make


def fixture_pipeline(worker: Worker, model: str) -> FixturePipeline:
    loaded = worker.runtime.registry.loaded()
    pipeline: FixturePipeline = loaded[PipelineKey("fixture", model, "cpu", "float32")].pipeline.first
    return pipeline


def test_two_jobs_that_do_not_fit_together_run_one_after_the_other(make_budget_worker, work_dir: Path) -> None:
    """A slow job holds its 60 MB model; a second job for another 60 MB model (a free slot, no room)
    waits, then parks the first model and succeeds; the first was never moved while it ran."""
    worker = make_budget_worker(GENERATION_ACQUIRE_TIMEOUT="10")

    async def scenario() -> tuple[dict, dict]:
        slow = asyncio.create_task(worker.handle(fixture_job(model="a", weights_mb=60, action="sleep", seconds=1.0)))
        await asyncio.sleep(0.3)
        second = await worker.handle(fixture_job(model="b", weights_mb=60))
        return await slow, second

    slow, second = asyncio.run(scenario())
    assert slow["output"] == "done" and second["output"] == "done"
    assert second["timings"]["queued_ms"] > 400  # it waited for room, not for a slot
    a = fixture_pipeline(worker, "a")
    (_, started, ended), = [event for event in a.events if event[0] == "run"]
    moves = [at for kind, _, at in a.events if kind == "move"]
    assert len(moves) == 2  # placed, then parked for b
    assert moves[0] <= started and moves[1] >= ended
    assert worker.runtime.residency.places() == {("fixture", "a"): "parked", ("fixture", "b"): "device"}
    assert_no_job_dirs(work_dir)


def test_no_room_in_time_is_timeout_and_cancelled_while_waiting_is_cancelled(make_budget_worker) -> None:
    """The second job gets TIMEOUT within a short acquire timeout, or CANCELLED when cancelled while
    it waits; the worker counts nothing for either afterwards and serves the next job."""
    worker = make_budget_worker(GENERATION_ACQUIRE_TIMEOUT="0.5")

    async def scenario() -> tuple[dict, dict, dict]:
        slow = asyncio.create_task(worker.handle(fixture_job(model="a", weights_mb=60, action="sleep", seconds=2.5)))
        await asyncio.sleep(0.3)
        timed_out = await worker.handle(fixture_job(model="b", weights_mb=60))
        waiting = asyncio.create_task(worker.handle({"id": "cancel-me", "input": {
            "task": "fixture", "model": "b", "weights_mb": 60, "working_mb": 1}}))
        await asyncio.sleep(0.2)
        waiting.cancel()
        cancelled = await waiting
        await slow
        return timed_out, cancelled, await worker.handle(fixture_job(model="b", weights_mb=60))

    timed_out, cancelled, after = asyncio.run(scenario())
    assert timed_out["error_code"] == "TIMEOUT" and "room" in timed_out["error"]
    assert cancelled["error_code"] == "CANCELLED"
    assert after["output"] == "done"
    memory = worker.runtime.residency
    assert memory.used() == 60 * MB  # b's weights alone: no working memory left counted
    assert worker.runtime.gate.busy == 0


# The mixed sequence on real tiny pipelines (random weights, loaded through from_pretrained like
# production) and real Whisper tiny.en, under a budget that holds any one task but not all.


def predicted_places(budget: int, jobs: list[tuple[str, int, int]], gone: str) -> list[dict[str, str]]:
    """What least-recently-used placement gives after each job: ``jobs`` are (pipeline, its weights,
    the job's working bytes); ``gone`` is the place an evicted pipeline takes (parked or dropped)."""
    places: dict[str, str] = {}
    recent: list[str] = []  # on the device, least recently used first
    after = []
    for name, weights, working in jobs:
        sizes = {job_name: job_weights for job_name, job_weights, _ in jobs}
        over = sum(sizes[n] for n in recent) + working + (0 if name in recent else weights) - budget
        for victim in [n for n in recent if n != name]:
            if over <= 0:
                break
            recent.remove(victim)
            places[victim] = gone
            over -= sizes[victim]
        if name in recent:
            recent.remove(name)
        recent.append(name)
        places[name] = "device"
        after.append(dict(places))
    return after


def frames_of(result: dict, target: Path) -> bytes:
    from tests.test_text2video import all_frames, save_video

    return all_frames(save_video(result, target))


@pytest.mark.slow
def test_a_mixed_sequence_fits_a_budget_that_holds_one_task_at_a_time(
    make_settings, tiny_sd: Path, tiny_wan: Path, tiny_vits: Path, tmp_path: Path,
) -> None:
    """Image, video, transcription, speech, image, video (and a last transcription) on a budget that
    holds any one of them but not all: every job succeeds, the places after each job are the ones
    least-recently-used placement predicts, and a pipeline brought back from host RAM gives what
    it gave when freshly loaded (same seed: same pixels, same frames; same transcript)."""
    from handler.pipelines.diffusion import loading
    from handler.pipelines.speech.pipeline import get_pipelines as speech_pipelines
    from handler.pipelines.speech.pipeline import working_bytes as speech_working
    from handler.pipelines.whisper.pipeline import get_pipelines as whisper_pipelines
    from handler.pipelines.whisper.pipeline import pipeline_working_bytes as whisper_working
    from testkit import media
    from tests.conftest import b64, run_job

    models = {"IMAGE_MODEL": str(tiny_sd), "VIDEO_MODEL": str(tiny_wan), "TTS_MODEL": str(tiny_vits)}
    registry = Registry(load_wait_timeout=120)
    loader = Worker(make_settings(**models), registry=registry).runtime  # loads each once, to learn its weight
    pools = {"text2image": loading.pipelines(loader, "text2image", str(tiny_sd)),
             "text2video": loading.pipelines(loader, "text2video", str(tiny_wan), video=True),
             "transcribe": whisper_pipelines(loader, "tiny.en"), "speech": speech_pipelines(loader, str(tiny_vits))}
    image = {"task": "text2image", "prompt": "a lighthouse", "num_inference_steps": 2, "seed": 7,
             "width": 64, "height": 64}
    video = {"task": "text2video", "prompt": "a red boat", "resolution": "144p", "fps": 8, "duration_s": 1.0,
             "num_inference_steps": 2, "seed": 4}
    listen = {"audio_base64": b64(media.speak("Hello world, this is a test.", tmp_path / "hello.wav"))}
    speak = {"task": "speech", "text": "Hello there.", "seed": 3}
    jobs = [("text2image", image), ("text2video", video), ("transcribe", listen), ("speech", speak),
            ("text2image", image), ("text2video", video), ("transcribe", listen)]
    video_frames = 9  # 1 s at 8 fps: one segment of 9 frames (a Wan clip is 4k+1 frames)
    working = {
        "text2image": loading.image_working_bytes(64, 64, 1),
        "text2video": loading.video_working_bytes(256, 144, video_frames),
        "transcribe": whisper_working(pools["transcribe"].first, batch=1, beams=5),
        "speech": speech_working(["Hello there."]),
    }
    needs = {task: pools[task].weights + working[task] for task in working}
    budget = max(needs.values()) + pools["text2image"].weights // 2
    assert budget < sum(pool.weights for pool in pools.values()) + max(working.values())

    # A worker whose residency has seen none of them: the loaded pools come in from host RAM.
    worker = Worker(make_settings(GPU_MEMORY_BUDGET_MB=str(-(-budget // MB)), **models), registry=registry)
    budget = worker.runtime.residency.budget
    assert budget is not None
    expected = predicted_places(budget, [(task, pools[task].weights, working[task]) for task, _ in jobs], "parked")
    results = []
    for (task, inputs), places in zip(jobs, expected, strict=True):
        result = run_job(worker, {"id": task, "input": inputs})
        assert "error" not in result, result
        results.append(result)
        assert {t: place for (t, _), place in worker.runtime.residency.places().items()} == places, task
    assert "parked" in {place for after in expected for place in after.values()}
    assert results[4]["files"][0]["base64"] == results[0]["files"][0]["base64"]
    assert frames_of(results[5], tmp_path / "b.mp4") == frames_of(results[1], tmp_path / "a.mp4")
    assert results[6]["transcription"] == results[2]["transcription"] and results[2]["transcription"].strip()


def test_the_video_text_encoder_is_offloaded_where_the_budget_needs_it(
    make_fresh_worker, tiny_wan: Path, tmp_path: Path
) -> None:
    """With VIDEO_TEXT_ENCODER_OFFLOAD the text encoder stays in host RAM under diffusers' offload
    hooks (counted as visiting, not as placed) and the video is frame for frame the one made without;
    `auto` offloads only where the pipeline's weights are over half the budget."""
    from handler.pipelines.diffusion import loading, speedups
    from tests.conftest import run_job

    video = {"task": "text2video", "prompt": "a red boat", "resolution": "144p", "fps": 8, "duration_s": 1.0,
             "num_inference_steps": 2, "seed": 4}
    frames = {}
    for offload in ("true", "false"):
        worker = make_fresh_worker(VIDEO_MODEL=str(tiny_wan), VIDEO_TEXT_ENCODER_OFFLOAD=offload)
        result = run_job(worker, {"id": offload, "input": video})
        assert "error" not in result, result
        frames[offload] = frames_of(result, tmp_path / f"{offload}.mp4")
        (pool,) = [loaded.pipeline for loaded in worker.runtime.registry.loaded().values()]
        encoder = pool.first.text_encoder
        assert speedups.is_offloaded(encoder) == (offload == "true")
        whole = sum(loading.module_bytes(m) for m in loading.modules(pool.first).values())
        if offload == "true":
            assert pool.weights == whole - loading.module_bytes(encoder)
            assert 0 < pool.placement.transient < loading.module_bytes(encoder)
        else:
            assert pool.weights == whole and pool.placement.transient == 0
    assert frames["true"] == frames["false"]

    runtime = make_fresh_worker(VIDEO_MODEL=str(tiny_wan)).runtime
    pipeline = pool.first  # the tiny pipeline weighs about 0.26 MB
    decisions = [loading.offload_text_encoder(dataclasses.replace(runtime, residency=Residency(
        device="cpu", budget=budget)), pipeline) for budget in (400_000, 1_000_000, None)]
    assert decisions == [True, False, False]


# The defaults' real footprints (their published architectures on the meta device).

GB = 10**9
GIB = 2**30
RESERVE = 2 * GIB
DEFAULT_REQUESTS = {"transcribe": "batch 8, beam 5", "text2image": "one 1024x1024 image",
                    "text2video": "81 frames of 832x480", "speech": "a sentence"}


@dataclasses.dataclass(frozen=True)
class DefaultNeed:
    """One task's default pipeline on a GPU: placed weights, what visits while it runs, working memory."""

    task: str
    label: str
    placed: int
    visiting: int
    working: int

    @property
    def alone(self) -> int:
        return self.placed + self.visiting + self.working


@pytest.fixture(scope="module")
def default_needs() -> dict[str, DefaultNeed]:
    """Each task's default pipeline, its weights measured on its published architecture."""
    from whisper.model import ModelDimensions

    from handler.pipelines.diffusion import loading
    from handler.pipelines.speech.pipeline import working_bytes as speech_working
    from handler.pipelines.whisper.pipeline import working_bytes as whisper_working
    from testkit.default_models import COMPONENTS, largest_leaf_bytes, umt5_xxl

    weights = {component.name: component.bytes() for component in COMPONENTS}
    turbo = ModelDimensions(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
                            n_vocab=51866, n_text_ctx=448, n_text_state=1280, n_text_head=20, n_text_layer=4)
    video = weights["Wan2.1 1.3B transformer"] + weights["Wan VAE"]
    video_working = loading.video_working_bytes(832, 480, 81)
    return {
        "transcribe": DefaultNeed("transcribe", "Whisper turbo (fp32 weights, fp16 compute)", weights["Whisper turbo"],
                                  0, whisper_working(turbo, fp16=True, batch=8, beams=5)),
        "text2image": DefaultNeed("text2image", "SDXL base (bf16)",
                                  sum(weights[n] for n in ("SDXL UNet", "SDXL text encoders", "SDXL VAE")), 0,
                                  loading.image_working_bytes(1024, 1024, 1)),
        "text2video": DefaultNeed("text2video", "Wan2.1 T2V 1.3B (bf16, VAE fp32)",
                                  video + weights["UMT5-XXL text encoder"], 0, video_working),
        "text2video-offloaded": DefaultNeed("text2video", "the same, its text encoder offloaded", video,
                                            2 * largest_leaf_bytes(umt5_xxl, torch.bfloat16), video_working),
        "speech": DefaultNeed("speech", "MMS-TTS (fp32)", weights["MMS-TTS"], 0, speech_working(["a sentence"])),
    }


def _gb(value: int) -> str:
    return f"{value / GB:.1f} GB"


def _table_rows(needs: dict[str, DefaultNeed]) -> list[str]:
    rows = []
    for need in needs.values():
        on_gpu = _gb(need.placed) + (f" + {_gb(need.visiting)} visiting" if need.visiting else "")
        request = DEFAULT_REQUESTS[need.task]
        rows.append(f"| `{need.task}`: {need.label} | {on_gpu} | {_gb(need.working)} ({request}) | {_gb(need.alone)} |")
    return rows


def _size_rows(needs: dict[str, DefaultNeed]) -> list[str]:
    rows = []
    whole_video = needs["text2video"].placed
    for size in (16, 24, 48, 80):
        budget = size * GIB - RESERVE
        offloaded = whole_video > budget // 2  # VIDEO_TEXT_ENCODER_OFFLOAD=auto
        tasks = [needs[t] for t in ("transcribe", "text2image",
                                    "text2video-offloaded" if offloaded else "text2video", "speech")]
        placed = sum(need.placed for need in tasks)
        resident = placed + max(need.visiting + need.working for need in tasks) <= budget
        fits_alone = all(need.alone <= budget for need in tasks)
        holds = ("all stay resident" if resident else
                 "each task alone; with several, idle ones are parked in host RAM" if fits_alone else "not every task")
        rows.append(f"| {size} GB | {budget / GIB:.0f} GiB | {'offloaded' if offloaded else 'on the GPU'} | "
                    f"{holds} ({_gb(placed)} of weights) |")
    return rows


@pytest.mark.slow
def test_the_memory_table_is_the_defaults_published_architectures(default_needs: dict[str, DefaultNeed]) -> None:
    """docs/operations.md's table of what each task needs at its defaults, and of which GPU sizes hold
    what, is computed here from the default models' architectures: it cannot drift from them."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    expected = _table_rows(default_needs) + _size_rows(default_needs)
    missing = [row for row in expected if row not in text]
    assert not missing, "docs/operations.md should have these rows:\n" + "\n".join(missing)
    assert default_needs["text2video"].placed == pytest.approx(14.7 * GB, rel=0.01)  # the count
    assert default_needs["text2image"].placed == pytest.approx(6.9 * GB, rel=0.01)


@pytest.mark.parametrize("offload", ["auto", "false"])
def test_the_mixed_sequence_at_real_footprints_never_plans_past_a_24_gb_budget(
    default_needs: dict[str, DefaultNeed], offload: str
) -> None:
    """The policy with the defaults' real footprints on a 24 GB GPU (22 GiB budget): the mixed
    sequence succeeds and what is counted on the device never passes the budget; with the video
    text encoder kept on the GPU the four do not fit at once, so pipelines are parked."""
    budget = 24 * GIB - RESERVE
    video = "text2video-offloaded" if offload == "auto" else "text2video"
    memory = Residency(device="cuda", budget=budget, host_reserve=0, host_room=lambda: 10**12)
    pools = {}
    for task in ("transcribe", "text2image", video, "speech"):
        need = default_needs[task]
        made = InstancePool([Weights()], Placement(weights=need.placed, transient=need.visiting, move=move_whole))
        made.key = PipelineKey(task, task, "cuda", "bfloat16")
        pools[need.task] = made
    peak = 0
    for task in ("text2image", "text2video", "transcribe", "speech", "text2image", "text2video"):
        with memory.hold(pools[task], working=default_needs[video if task == "text2video" else task].working,
                         timeout=1):
            peak = max(peak, memory.used())
            assert memory.used() <= budget
    parked = memory.moves.counts.get(("text2image", "park"), 0) + memory.moves.counts.get(("text2video", "park"), 0)
    assert (parked > 0) == (offload == "false")
    assert peak <= budget


def test_places_are_visible_in_system_and_metrics(make_budget_worker) -> None:
    """`system` shows each pipeline's place, bytes and use, and the budget; /metrics has
    worker_pipeline_bytes by place and worker_pipeline_moves_total by direction."""
    from handler.http.metrics import Metrics

    worker = make_budget_worker()

    async def scenario() -> dict:
        for model in ("a", "b"):
            assert "error" not in await worker.handle(fixture_job(model=model, weights_mb=60))
        return await worker.handle({"id": "s", "input": {"task": "system"}})

    snapshot = asyncio.run(scenario())
    places = {p["model"]: (p["place"], p["memory_mb"], p["in_use"]) for p in snapshot["pipelines"]}
    assert places == {"a": ("parked", 60.0, 0), "b": ("device", 60.0, 0)}
    assert snapshot["memory"]["gpu_budget"] == {"budget_mb": 100.0, "used_mb": 60.0, "device": "cpu"}
    text = Metrics(worker.runtime, tasks=worker.tasks).text().decode()
    assert 'worker_pipeline_bytes{model="a",place="parked",task="fixture"} 6.291456e+07' in text
    assert 'worker_pipeline_moves_total{direction="park",task="fixture"} 1.0' in text


def test_every_copy_moves_and_counts_and_self_placing_pipelines_stay(make_budget_worker, tiny_wan: Path) -> None:
    """With MODEL_INSTANCES=2 a pool weighs both copies and both move; a pipeline its own offload hooks
    place (VIDEO_GROUP_OFFLOAD) is never moved, its largest component counted while it runs."""
    from handler.pipelines.diffusion import loading

    worker = make_budget_worker(MODEL_INSTANCES="2")

    async def scenario() -> None:
        for model in ("a", "b"):
            assert "error" not in await worker.handle(fixture_job(model=model, weights_mb=25))

    asyncio.run(scenario())
    (pool_a,) = [p.pipeline for k, p in worker.runtime.registry.loaded().items() if k.model == "a"]
    assert pool_a.weights == 50 * MB and worker.runtime.residency.used() == 100 * MB
    assert all(len([e for e in copy.events if e[0] == "move"]) == 1 for copy in pool_a.instances)

    video = make_budget_worker(VIDEO_GROUP_OFFLOAD="leaf", VIDEO_MODEL=str(tiny_wan)).runtime
    pool = loading.pipelines(video, "text2video", str(tiny_wan), video=True)
    assert pool.placement.move is None and pool.running_bytes == pool.placement.transient > 0
    video.residency.place(pool, timeout=1)
    assert video.residency.places() == {("text2video", str(tiny_wan)): "device"}


def test_a_request_too_large_for_the_budget_is_refused_before_any_load(
    make_fresh_worker, tiny_sd: Path, tiny_wan: Path
) -> None:
    """A video or a batch of images whose working memory alone passes the budget is INPUT_TOO_LARGE,
    naming the field, before the model loads (nothing in the registry afterwards)."""
    from tests.conftest import run_job

    worker = make_fresh_worker(GPU_MEMORY_BUDGET_MB="20", IMAGE_MODEL=str(tiny_sd), VIDEO_MODEL=str(tiny_wan))
    video = run_job(worker, {"id": "v", "input": {"task": "text2video", "prompt": "a boat", "resolution": "480p"}})
    assert video["error_code"] == "INPUT_TOO_LARGE" and video["field"] == "resolution", video
    assert "budget" in video["error"] and "MiB" in video["error"]
    images = run_job(worker, {"id": "i", "input": {"task": "text2image", "prompt": "a boat", "width": 512,
                                                   "height": 512, "num_images": 4}})
    assert images["error_code"] == "INPUT_TOO_LARGE" and images["field"] == "num_images", images
    assert worker.runtime.registry.loaded() == {}
