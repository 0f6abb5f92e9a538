"""``text2image``: prompt in, PNG/JPEG/WebP images out (diffusers SD / SDXL / FLUX class pipelines).

Limits are checked before anything is loaded; sizes are checked against the model (its
default size, and the multiple its VAE and patching need) before any GPU work.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Literal

import torch
from pydantic import AliasChoices, Field

from handler.errors import InputTooLarge, InvalidInput
from handler.job import JobContext
from handler.limits import check_pixels, check_steps, served_model
from handler.pipelines.diffusion import loading
from handler.pipelines.diffusion.steps import step_callback
from handler.pipelines.weights import model_identity
from handler.runtime.container import Runtime
from handler.runtime.instances import InstancePool
from handler.runtime.progress import Progress
from handler.task_interface import CachePolicy, Task, TaskInput, input_fields, new_seed

ImageFormat = Literal["png", "jpeg", "webp"]
_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_DEFAULT_STEPS = 30


class ImageInput(TaskInput):
    """Input of the ``text2image`` task (field names of diffusers and worker-sdxl)."""

    unsupported: ClassVar[dict[str, str]] = {
        "refiner_inference_steps": "the SDXL refiner is not part of this worker; the base model runs alone",
        "high_noise_frac": "the SDXL refiner is not part of this worker; the base model runs alone",
        "strength": "image-to-image is not supported; send a prompt only",
        "image_url": "image-to-image is not supported; send a prompt only",
        "scheduler": "the model's own scheduler is used",
    }

    task: Literal["text2image"] = "text2image"
    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str | None = Field(None, max_length=4000)
    model: str | None = Field(None, description="image model; default IMAGE_MODEL")
    width: int | None = Field(None, ge=64, le=8192, description="default: the model's size")
    height: int | None = Field(None, ge=64, le=8192)
    num_images: int = Field(1, ge=1)
    num_inference_steps: int = Field(
        _DEFAULT_STEPS, ge=1, validation_alias=AliasChoices("num_inference_steps", "steps"),
        description="denoising steps (`steps` is accepted too)",
    )
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0, description="default: the model's")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    format: ImageFormat = "png"


# A diffusers pipeline (typed loosely: diffusers has no type information).
DiffusionPipeline = Any


def get_pipelines(runtime: Runtime, name: str) -> InstancePool[DiffusionPipeline]:
    return loading.pipelines(runtime, "text2image", name)


def preload(runtime: Runtime) -> None:
    """Load the default model and place it on the device (a resident like any, parked when idle and
    needed elsewhere)."""
    pipelines = get_pipelines(runtime, runtime.settings.image_model)
    runtime.residency.place(pipelines, timeout=runtime.settings.generation_acquire_timeout)


def _check_limits(ctx: JobContext, params: ImageInput) -> None:
    settings = ctx.settings
    if params.num_images > settings.max_images:
        raise InputTooLarge(f"num_images: {params.num_images} is over the limit of {settings.max_images}",
                            field="num_images")
    check_steps(params.num_inference_steps, settings.max_steps)
    if params.width and params.height:
        check_pixels(params.width, params.height, settings.max_image_pixels, field="width", label="width x height")
    served_model(params.model, settings.image_model)


def resolve_size(ctx: JobContext, pipeline: DiffusionPipeline, params: ImageInput) -> tuple[int, int]:
    """The (width, height) to generate, checked against the model."""
    default = loading.default_size(pipeline)
    width, height = params.width or default, params.height or default
    multiple = loading.size_multiple(pipeline)
    for field, value in (("width", width), ("height", height)):
        if value % multiple:
            raise InvalidInput(f"{field}: {value} is not a multiple of {multiple}, as this model needs", field=field)
    check_pixels(width, height, ctx.settings.max_image_pixels, field="width", label="width x height")
    return width, height


def _call_options(pipeline: DiffusionPipeline, params: ImageInput, width: int, height: int) -> dict[str, Any]:
    accepted = inspect.signature(pipeline.__call__).parameters
    if params.negative_prompt is not None and "negative_prompt" not in accepted:
        raise InvalidInput("negative_prompt: this model does not take a negative prompt", field="negative_prompt")
    options: dict[str, Any] = {
        "prompt": params.prompt, "width": width, "height": height, "num_inference_steps": params.num_inference_steps,
        "num_images_per_prompt": params.num_images, "output_type": "pil",
    }
    if params.negative_prompt is not None:
        options["negative_prompt"] = params.negative_prompt
    if params.guidance_scale is not None:
        options["guidance_scale"] = params.guidance_scale
    return options


def _save(ctx: JobContext, images: list[Any], fmt: ImageFormat) -> list[tuple[Any, str]]:
    saved = []
    for index, image in enumerate(images):
        name = f"image-{index}.{'jpg' if fmt == 'jpeg' else fmt}"
        path = ctx.workdir / name
        image.save(path, format=fmt.upper(), **({} if fmt == "png" else {"quality": 95}))
        saved.append((path, name))
    return saved


async def run(ctx: JobContext, params: ImageInput) -> dict[str, Any]:
    _check_limits(ctx, params)
    model = params.model or ctx.settings.image_model
    # Only a seeded request has one answer to remember.
    key = await ctx.generation_key(params, CACHE, deterministic=params.seed is not None)
    return await ctx.cached(key, CACHE, lambda: _generate(ctx, params, model))


def _refuse_unfitting(ctx: JobContext, params: ImageInput, need: int, width: int, height: int) -> None:
    """INPUT_TOO_LARGE for a request that could never fit the GPU memory budget (``need`` bytes with
    the model's weights), naming what makes it large."""
    field = "num_images" if params.num_images > 1 else "width"
    ctx.runtime.residency.check_fits(need, field=field, what=f"{params.num_images} image(s) of {width}x{height}")


async def _generate(ctx: JobContext, params: ImageInput, model: str) -> dict[str, Any]:
    if params.width is not None and params.height is not None:  # before the load, weights from the files
        need = (loading.least_device_weights(ctx.runtime, model, video=False)
                + loading.image_working_bytes(params.width, params.height, params.num_images))
        _refuse_unfitting(ctx, params, need, params.width, params.height)
    pipelines = await ctx.load(lambda: get_pipelines(ctx.runtime, model))
    width, height = resolve_size(ctx, pipelines.first, params)
    working = loading.image_working_bytes(width, height, params.num_images)
    _refuse_unfitting(ctx, params, pipelines.running_bytes + working, width, height)
    options = _call_options(pipelines.first, params, width, height)
    seed = params.seed if params.seed is not None else new_seed()
    progress = Progress(ctx.job, enabled=ctx.settings.post_progress)

    def work(pipeline: DiffusionPipeline) -> list[Any]:
        generator = torch.Generator("cpu").manual_seed(seed)
        callback = step_callback(ctx.cancel, progress, params.num_inference_steps)
        return list(pipeline(**options, generator=generator, callback_on_step_end=callback).images)

    images = await ctx.on_model(pipelines, work, working=working)
    saved = await ctx.in_thread(lambda: _save(ctx, images, params.format))
    files = await ctx.save_files([(path, name, _CONTENT_TYPES[params.format]) for path, name in saved])
    return {"model": model, "seed": seed, "width": width, "height": height,
            "num_inference_steps": params.num_inference_steps, "num_images": len(files), "files": files}


CACHE: CachePolicy[ImageInput] = CachePolicy(
    outputs=frozenset({"model", "seed", "width", "height", "num_inference_steps", "num_images", "files"}),
    shaping=lambda settings, params: {**input_fields(params), "model": params.model or settings.image_model,
                                      "precision": settings.precision},
    models={"model": model_identity},
)

TASK: Task[ImageInput] = Task(name="text2image", input_model=ImageInput, run=run, preload=preload, cache=CACHE)
