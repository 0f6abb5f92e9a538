"""OpenAI's audio and image API, field by field, onto the worker's own jobs and back.

Requests become the input of a ``transcribe``, ``speech`` or ``text2image`` job; results become
the response shapes of OpenAI's API reference. What differs from OpenAI is refused by name (a
field this worker cannot honour) rather than ignored, except ``voice`` and ``user``, which are
accepted and have no effect (one voice per speech model; no per-user accounting).
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from typing import Any

from whisper.tokenizer import LANGUAGES

from handler.config import Settings
from handler.errors import InvalidInput, printable, shown
from handler.http.uploads import Form
from handler.io.inputs import ATTACHED
from handler.io.media_out import AUDIO_ENCODINGS, encode_audio

TRANSCRIPTION_FORMATS = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")
# Form fields too large for the in-memory text limit: audio as data URLs, spooled to disk.
LARGE_FIELDS = frozenset({"known_speaker_references[]", "known_speaker_references"})
_CHUNKING_KEYS = ("type", "prefix_padding_ms", "silence_duration_ms", "threshold")
GRANULARITIES = ("word", "segment")
# OpenAI's speech model names: what its clients send; the worker's TTS_MODEL answers them.
SPEECH_ALIASES = frozenset({"tts-1", "tts-1-hd", "gpt-4o-mini-tts"})
# OpenAI's speech formats; all but wav are encoded by ffmpeg (handler.io.media_out.AUDIO_ENCODINGS).
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
IMAGE_FORMATS = ("url", "b64_json")
_SIZE = re.compile(r"(\d{2,5})x(\d{2,5})")
# Request field -> job field, to name the request's own field in an error.
TRANSCRIPTION_FIELDS = {"audio": "file", "initial_prompt": "prompt", "word_timestamps": "timestamp_granularities",
                        "known_speakers": "known_speaker_names", "num_speakers": "known_speaker_names",
                        **{f"known_speakers.{i}.audio_base64": "known_speaker_references" for i in range(4)},
                        **{f"known_speakers.{i}.name": "known_speaker_names" for i in range(4)}}
SPEECH_FIELDS = {"text": "input", "speaking_rate": "speed"}
IMAGE_FIELDS = {"num_images": "n", "width": "size", "height": "size"}


@dataclass(frozen=True)
class TranscriptionAsk:
    """How the client wants its transcript back."""

    response_format: str
    granularities: frozenset[str]
    translate: bool
    stream: bool


def _choice(value: str | None, choices: tuple[str, ...], *, field: str, default: str) -> str:
    if value is None or value == "":
        return default
    if value not in choices:
        raise InvalidInput(f"{field}: {printable(value)!r} is not one of {', '.join(choices)}", field=field)
    return value


def _number(value: str | float | None, *, field: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidInput(f"{field}: expected a number, got {shown(value)}", field=field)
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{field}: expected a number, got {shown(value)}", field=field) from exc


def _flag(value: str | None, *, field: str) -> bool:
    if value in (None, "", "false", "False", "0"):
        return False
    if value in ("true", "True", "1"):
        return True
    raise InvalidInput(f"{field}: expected true or false, got {printable(str(value))!r}", field=field)


def _check_known(names: set[str] | list[str], known: frozenset[str]) -> None:
    for name in names:
        if name not in known:
            raise InvalidInput(f"{printable(name)}: not a field of this route (fields: {', '.join(sorted(known))})",
                               field=printable(name))


_TRANSCRIBE_KNOWN = frozenset({"file", "model", "language", "prompt", "response_format", "temperature",
                               "timestamp_granularities[]", "timestamp_granularities", "stream",
                               "known_speaker_names[]", "known_speaker_names", *LARGE_FIELDS, "chunking_strategy",
                               *(f"chunking_strategy[{key}]" for key in _CHUNKING_KEYS)})
_TRANSLATE_KNOWN = frozenset({"file", "model", "prompt", "response_format", "temperature"})


def transcription_job(form: Form, *, translate: bool) -> tuple[dict[str, Any], TranscriptionAsk]:
    """The ``transcribe`` job of a transcription (or translation) form, and how to answer it."""
    _check_known([*form.fields, *form.files, *form.spooled], _TRANSLATE_KNOWN if translate else _TRANSCRIBE_KNOWN)
    if "file" not in form.files:
        raise InvalidInput("file: required, the audio file to transcribe", field="file")
    fmt = _choice(form.text("response_format"), TRANSCRIPTION_FORMATS, field="response_format", default="json")
    granularities = [*form.fields.get("timestamp_granularities[]", []), *form.fields.get("timestamp_granularities", [])]
    for value in granularities:
        _choice(value, GRANULARITIES, field="timestamp_granularities", default="segment")
    if granularities and fmt != "verbose_json":
        raise InvalidInput("timestamp_granularities: needs response_format verbose_json",
                           field="timestamp_granularities")
    stream = _flag(form.text("stream"), field="stream")
    if stream and fmt not in ("json", "text", "diarized_json"):
        raise InvalidInput("stream: streams only with response_format json, text or diarized_json", field="stream")
    _check_chunking(form)
    text_format = {"srt": "srt", "vtt": "vtt"}.get(fmt, "plain_text")
    job: dict[str, Any] = {"task": "transcribe", "audio": f"{ATTACHED}file", "word_timestamps": "word" in granularities}
    job["translation" if translate else "transcription"] = text_format
    if translate:
        job["translate"] = True
    for name, target in (("model", "model"), ("language", "language"), ("prompt", "initial_prompt")):
        given = form.text(name)
        if given:
            job[target] = given
    temperature = _number(form.text("temperature"), field="temperature")
    if temperature is not None:
        job["temperature"] = temperature
    known = _known_speakers(form)
    if fmt == "diarized_json":
        job["diarize"] = True
        if known:
            job["known_speakers"] = known
    elif known:
        raise InvalidInput("known_speaker_names: needs response_format diarized_json", field="known_speaker_names")
    ask = TranscriptionAsk(fmt, frozenset(granularities or ("segment",)), translate, stream)
    return job, ask


def _known_speakers(form: Form) -> list[dict[str, Any]]:
    """``known_speaker_names[]`` paired with ``known_speaker_references[]`` (data URLs) in order."""
    names = [*form.fields.get("known_speaker_names[]", []), *form.fields.get("known_speaker_names", [])]
    references = [*form.large_texts("known_speaker_references[]"), *form.large_texts("known_speaker_references")]
    if len(names) != len(references):
        raise InvalidInput(f"known_speaker_references: {len(references)} references for {len(names)} names",
                           field="known_speaker_references")
    for reference in references:
        if not reference.startswith("data:"):
            raise InvalidInput("known_speaker_references: expected data URLs (data:audio/...;base64,...)",
                               field="known_speaker_references")
    return [{"name": name, "audio_base64": reference} for name, reference in zip(names, references, strict=True)]


def _check_chunking(form: Form) -> None:
    """``chunking_strategy``: ``auto`` or a ``server_vad`` object, as OpenAI documents it. Accepted and
    checked; the worker always cuts long audio at pauses found by its own VAD."""
    value = form.text("chunking_strategy")
    parts = {key: form.text(f"chunking_strategy[{key}]") for key in _CHUNKING_KEYS}
    if value is not None and value != "auto":
        raise InvalidInput("chunking_strategy: expected auto or a server_vad object", field="chunking_strategy")
    if all(part is None for part in parts.values()):
        return
    if parts["type"] != "server_vad":
        raise InvalidInput("chunking_strategy: type must be server_vad", field="chunking_strategy")
    for key in ("prefix_padding_ms", "silence_duration_ms", "threshold"):
        number = _number(parts[key], field=f"chunking_strategy[{key}]")
        if number is not None and (number < 0 or (key == "threshold" and number > 1)):
            raise InvalidInput(f"chunking_strategy[{key}]: out of range", field="chunking_strategy")


def _segments(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job's segments (ids from 1, as worker-faster_whisper counts) as OpenAI's (ids from 0)."""
    keys = ("seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio",
            "no_speech_prob")
    return [{"id": number, **{key: segment.get(key) for key in keys}} for number, segment in enumerate(segments)]


def transcription_body(output: dict[str, Any], ask: TranscriptionAsk) -> tuple[str | dict[str, Any], str]:
    """The response (JSON, or text with its media type) of a finished transcription job."""
    text = str(output["translation"] if ask.translate else output["transcription"])
    if ask.response_format == "json":
        return {"text": text}, "application/json"
    if ask.response_format == "text":
        return text, "text/plain; charset=utf-8"
    if ask.response_format == "srt":
        return text, "application/x-subrip"
    if ask.response_format == "vtt":
        return text, "text/vtt; charset=utf-8"
    if ask.response_format == "diarized_json":
        return {"task": "transcribe", "duration": output["duration_s"], "text": text,
                "segments": diarized_segments(output["segments"]),
                "usage": {"type": "duration", "seconds": output["duration_s"]}}, "application/json"
    language = "en" if ask.translate else (output.get("detected_language") or "en")
    body: dict[str, Any] = {
        "task": "translate" if ask.translate else "transcribe",
        "language": LANGUAGES.get(language, language),
        "duration": output["duration_s"],
        "text": text,
        "usage": {"type": "duration", "seconds": output["duration_s"]},
    }
    if "segment" in ask.granularities:
        body["segments"] = _segments(output["translation_segments"] if ask.translate else output["segments"])
    if "word" in ask.granularities and not ask.translate:
        body["words"] = [{key: word[key] for key in ("word", "start", "end")}
                         for word in output.get("word_timestamps", [])]
    return body, "application/json"


def diarized_segments(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job's segments as OpenAI's diarized ones (also the ``transcript.text.segment`` events)."""
    return [{"type": "transcript.text.segment", "id": f"seg_{number}", "start": segment["start"],
             "end": segment["end"], "text": str(segment["text"]).strip(), "speaker": segment.get("speaker", "A")}
            for number, segment in enumerate(segments)]


def delta_event(text: str) -> dict[str, Any]:
    return {"type": "transcript.text.delta", "delta": text}


def done_event(output: dict[str, Any]) -> dict[str, Any]:
    return {"type": "transcript.text.done", "text": output["transcription"]}


_SPEECH_KNOWN = frozenset({"model", "input", "voice", "response_format", "speed"})


def speech_job(body: dict[str, Any], settings: Settings, *, encoders: frozenset[str]) -> tuple[dict[str, Any], str]:
    """The ``speech`` job of ``POST /v1/audio/speech``, and its ``response_format`` (mp3 unless
    asked, as OpenAI's); a format whose encoder this machine's ffmpeg (``encoders``) lacks is refused."""
    _check_known(list(body), _SPEECH_KNOWN)
    voice = body.get("voice")
    if voice is not None and not (isinstance(voice, str) and len(voice) <= 64):
        raise InvalidInput("voice: expected a voice name (one voice per model here; any name is accepted)",
                           field="voice")
    fmt = body.get("response_format")
    fmt = _choice(fmt if isinstance(fmt, str) or fmt is None else repr(fmt), SPEECH_FORMATS,
                  field="response_format", default="mp3")
    encoding = AUDIO_ENCODINGS.get(fmt)
    if encoding is not None and encoding.encoder not in encoders:
        raise InvalidInput(f"response_format: {fmt} needs ffmpeg's {encoding.encoder} encoder, which this "
                           "worker's ffmpeg lacks; ask for wav", field="response_format")
    job: dict[str, Any] = {"task": "speech", "text": body.get("input")}
    model = body.get("model")
    if model is not None and model not in SPEECH_ALIASES:
        job["model"] = model
    speed = _number(body.get("speed"), field="speed")
    if speed is not None:
        job["speaking_rate"] = speed
    return job, fmt


def speech_audio(output: dict[str, Any], fmt: str, *, timeout_s: float) -> tuple[bytes, str]:
    """The speech job's WAV in ``fmt`` (ffmpeg for all but wav), and its media type. Blocking."""
    wav = base64.b64decode(output["files"][0]["base64"])
    encoding = AUDIO_ENCODINGS.get(fmt)
    if encoding is None:
        return wav, "audio/wav"
    return encode_audio(wav, encoding, timeout_s=timeout_s), encoding.media_type


_IMAGE_KNOWN = frozenset({"prompt", "model", "n", "size", "response_format", "user"})


def image_job(body: dict[str, Any], *, has_bucket: bool) -> tuple[dict[str, Any], str]:
    """The ``text2image`` job of ``POST /v1/images/generations``, and the response format."""
    _check_known(list(body), _IMAGE_KNOWN)
    default = "url" if has_bucket else "b64_json"
    raw = body.get("response_format")
    fmt = _choice(raw if isinstance(raw, str) or raw is None else repr(raw), IMAGE_FORMATS,
                  field="response_format", default=default)
    if fmt == "url" and not has_bucket:
        raise InvalidInput("response_format: url needs a bucket (BUCKET_*); ask for b64_json",
                           field="response_format")
    job: dict[str, Any] = {"task": "text2image", "prompt": body.get("prompt")}
    for name, target in (("model", "model"), ("n", "num_images")):
        if body.get(name) is not None:
            job[target] = body[name]
    size = body.get("size")
    if size not in (None, "auto"):
        found = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if found is None:
            raise InvalidInput(f"size: expected WIDTHxHEIGHT such as 512x512, or auto; got {shown(size)}",
                               field="size")
        job["width"], job["height"] = int(found[1]), int(found[2])
    return job, fmt


def image_body(output: dict[str, Any], fmt: str) -> dict[str, Any]:
    key = "b64_json" if fmt == "b64_json" else "url"
    source = "base64" if fmt == "b64_json" else "url"
    return {"created": int(time.time()), "data": [{key: file[source]} for file in output["files"]],
            "size": f"{output['width']}x{output['height']}", "output_format": "png"}


def models_body(settings: Settings) -> dict[str, Any]:
    """``GET /v1/models``: every model a request may name, aliases included."""
    names: dict[str, str] = {}
    for name in settings.allowed_whisper_models():
        names[name] = "transcribe"
    for alias, _target in settings.whisper_model_map:
        names.setdefault(alias, "transcribe")
    for name in (settings.tts_model, *sorted(SPEECH_ALIASES)):
        names.setdefault(name, "speech")
    names.setdefault(settings.image_model, "text2image")
    names.setdefault(settings.video_model, "text2video")
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "runpod-media-worker", "task": task}
            for name, task in names.items()]
    return {"object": "list", "data": data}
