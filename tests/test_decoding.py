"""Batched Whisper decoding on real tiny.en weights and espeak-ng speech."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import whisper

from handler.cancel import CancelToken
from handler.errors import Cancelled
from handler.pipelines.whisper import batch_task, decoding, vad
from handler.pipelines.whisper.options import DecodeOptions
from handler.pipelines.whisper.pipeline import load_checkpoint
from handler.pipelines.whisper.sections import Sections
from handler.pipelines.whisper.vad import Chunk
from handler.pipelines.whisper.windows import Window, WindowInput
from testkit import clips, media

# Beam search at temperature 0 only: deterministic, so two runs can be compared token for token;
# chunks independent (no chunk prompted with the text before it), so any batch gives the same tokens.
BEAM: dict[str, Any] = {"temperature": (0.0,), "beam_size": 5, "best_of": 5, "condition_on_previous_text": False}
GREEDY: dict[str, Any] = {"temperature": (0.0,), "beam_size": None, "best_of": None,
                          "condition_on_previous_text": False}


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Any:
    return load_checkpoint(model_dir / "whisper" / "tiny.en.pt", "cpu")


@pytest.fixture(scope="module")
def chunks(gapped_clip: clips.Clip) -> list[Chunk]:
    """One VAD chunk per sentence, so that a batch of 4 holds four different windows."""
    found = vad.speech_chunks(gapped_clip.audio, max_chunk_s=6.0)
    assert len(found) == 4
    return found


@pytest.fixture(scope="module")
def beam_batched(model: Any, gapped_clip: clips.Clip, chunks: list[Chunk]) -> dict[str, Any]:
    """The four chunks in one batch, beam 5, with word timings."""
    options = {**BEAM, "word_timestamps": True}
    return decoding.transcribe_chunks(model, gapped_clip.audio, chunks, options=options, batch_size=4)


def _tokens_per_chunk(result: dict[str, Any]) -> dict[int, list[int]]:
    by_seek: dict[int, list[int]] = {}
    for segment in result["segments"]:
        by_seek.setdefault(segment["seek"], []).extend(segment["tokens"])
    return by_seek


def test_beam_search_in_a_batch_gives_the_tokens_of_one_chunk_at_a_time(
    model: Any, gapped_clip: clips.Clip, chunks: list[Chunk], beam_batched: dict[str, Any]
) -> None:
    """Beam 5 over 4 chunks at once yields, chunk by chunk, the tokens of decoding each alone.

    openai-whisper's own DecodingTask fails here (cross-attention shape mismatch); this is
    what BatchDecodingTask fixes.
    """
    alone = decoding.transcribe_chunks(model, gapped_clip.audio, chunks, options=BEAM, batch_size=1)
    assert len(_tokens_per_chunk(alone)) == 4
    assert _tokens_per_chunk(beam_batched) == _tokens_per_chunk(alone)


def test_greedy_in_a_batch_gives_the_tokens_of_one_chunk_at_a_time(
    model: Any, gapped_clip: clips.Clip, chunks: list[Chunk]
) -> None:
    """Greedy decoding of 4 chunks at once yields the same tokens per chunk as one at a time."""
    batched = decoding.transcribe_chunks(model, gapped_clip.audio, chunks, options=GREEDY, batch_size=4)
    alone = decoding.transcribe_chunks(model, gapped_clip.audio, chunks, options=GREEDY, batch_size=1)
    assert len(_tokens_per_chunk(alone)) == 4
    assert _tokens_per_chunk(batched) == _tokens_per_chunk(alone)


def test_batched_transcript_has_the_words_of_sequential_whisper(
    model: Any, gapped_clip: clips.Clip, beam_batched: dict[str, Any]
) -> None:
    """Batched beam search and greedy both recognise the spoken words, as whisper.transcribe does."""
    sequential = whisper.transcribe(model, gapped_clip.audio, verbose=None, fp16=False, **BEAM)
    greedy = decoding.transcribe_chunks(model, gapped_clip.audio, vad.speech_chunks(gapped_clip.audio), options=GREEDY,
                                       batch_size=4)
    for result in (sequential, beam_batched, greedy):
        assert media.recognised(result["text"]) >= 0.8, result["text"]
    shared = media.words_of(beam_batched["text"]) & media.words_of(sequential["text"])
    assert len(shared) >= 0.8 * len(media.words_of(sequential["text"])), (beam_batched["text"], sequential["text"])
    assert beam_batched["language"] == "en"
    assert beam_batched["text"] == "".join(segment["text"] for segment in beam_batched["segments"])


def _assert_ordered_inside_chunks(result: dict[str, Any], chunks: list[Chunk]) -> None:
    segments = result["segments"]
    assert [segment["id"] for segment in segments] == list(range(len(segments)))
    assert all(a["start"] <= b["start"] and a["end"] <= b["end"] for a, b in itertools.pairwise(segments))
    for segment in segments:
        chunk = next(c for c in chunks if c.start // 160 == segment["seek"])
        assert chunk.start_s - 0.01 <= segment["start"] <= segment["end"] <= chunk.end_s, (segment, chunk)


def test_segments_are_ordered_and_inside_their_chunks(
    model: Any, gapped_clip: clips.Clip, chunks: list[Chunk], beam_batched: dict[str, Any]
) -> None:
    """Segment times are in recording time, in order, each inside the chunk (so the audio) it came from.

    Both from the timestamp tokens alone and after word timings have moved segment edges.
    """
    _assert_ordered_inside_chunks(beam_batched, chunks)
    greedy = decoding.transcribe_chunks(model, gapped_clip.audio, chunks, options=GREEDY, batch_size=4)
    _assert_ordered_inside_chunks(greedy, chunks)


def test_word_timings_are_monotonic_and_inside_the_audio(beam_batched: dict[str, Any], gapped_clip: clips.Clip) -> None:
    """Within each segment every word starts before it ends and after the previous one ends, inside the audio."""
    segments = beam_batched["segments"]
    assert media.recognised(" ".join(w["word"] for s in segments for w in s["words"])) >= 0.8
    for segment in segments:
        words = segment["words"]
        assert words, segment
        assert all(w["start"] <= w["end"] for w in words), words
        assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(words)), words
        assert words[0]["start"] >= 0.0 and words[-1]["end"] <= gapped_clip.duration_s, segment


@pytest.fixture
def decoder_runs(model: Any) -> Iterator[list[int]]:
    """Rows of every decode the model runs (rows = chunks x beams or samples), in order: the rows of
    each decode's second step (its first pass over the prompt runs once per chunk)."""
    rows: list[int] = []
    started = [False]

    def second_step(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if started[0]:
            rows.append(int(args[0].shape[0]))
        started[0] = kwargs.get("kv_cache") == {}  # the first step of a decode; later steps fill the cache

    hook = model.decoder.register_forward_pre_hook(second_step, with_kwargs=True)
    yield rows
    hook.remove()


def test_fallback_decodes_only_the_failing_chunks_again(
    model: Any, gapped_clip: clips.Clip, chunks: list[Chunk], decoder_runs: list[int]
) -> None:
    """With an impossible logprob_threshold, speech chunks fall back through every temperature, silent ones don't.

    Silence is exempt from fallback (as in whisper.transcribe), so of [speech, silence, speech,
    silence] only the two speech chunks are decoded again, together, at each higher temperature.
    """
    gap_start, gap_end = gapped_clip.gaps[0]
    silence = Chunk(gap_start + 1600, gap_end - 1600)
    mixed = [chunks[0], silence, chunks[2], Chunk(gapped_clip.gaps[2][0] + 1600, gapped_clip.gaps[2][1] - 1600)]
    options = {**GREEDY, "temperature": (0.0, 0.5, 1.0), "best_of": 2, "logprob_threshold": 0.0}
    result = decoding.transcribe_chunks(model, gapped_clip.audio, mixed, options=options, batch_size=4)
    assert decoder_runs == [4, 2 * 2, 2 * 2]  # 4 chunks greedy, then 2 chunks x best_of 2, twice
    assert {segment["seek"] for segment in result["segments"]} == {mixed[0].start // 160, mixed[2].start // 160}
    assert {segment["temperature"] for segment in result["segments"]} == {1.0}


def test_fallback_keeps_the_first_result_of_chunks_that_pass(
    model: Any, gapped_clip: clips.Clip, chunks: list[Chunk]
) -> None:
    """decode_with_fallback returns one result per chunk, each at the temperature where it stopped."""
    mel = whisper.log_mel_spectrogram(gapped_clip.audio, model.dims.n_mels, padding=whisper.audio.N_SAMPLES)
    windows = torch.stack([whisper.pad_or_trim(mel[:, c.start // 160 : c.end // 160], 3000) for c in chunks[:2]])
    settings = DecodeOptions.from_options(model, {**GREEDY, "temperature": (0.0, 1.0)})
    with torch.no_grad():
        results = batch_task.decode_with_fallback(model, model.encoder(windows), settings)
    assert [r.temperature for r in results] == [0.0, 0.0]
    assert media.recognised(" ".join(r.text for r in results)) >= 0.8


def test_setting_the_cancel_token_stops_decoding_at_the_next_step(model: Any, gapped_clip: clips.Clip) -> None:
    """A token cancelled mid-decode raises Cancelled at the next decoder step; no hook stays on the model."""
    token = CancelToken()
    steps: list[int] = []

    def cancel_at_step_five(_module: Any, _args: Any) -> None:
        steps.append(1)
        if len(steps) == 5:
            token.cancel()

    hook = model.decoder.register_forward_pre_hook(cancel_at_step_five)
    try:
        with pytest.raises(Cancelled):
            decoding.transcribe_chunks(model, gapped_clip.audio, vad.speech_chunks(gapped_clip.audio), options=GREEDY,
                                       cancel=token)
    finally:
        hook.remove()
    assert len(steps) == 5
    assert not model.decoder._forward_pre_hooks and not model.decoder.blocks[0].attn.key._forward_hooks


def test_a_cancelled_token_stops_before_the_first_batch(model: Any, gapped_clip: clips.Clip) -> None:
    """An already cancelled job decodes nothing."""
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        decoding.transcribe_chunks(model, gapped_clip.audio, vad.speech_chunks(gapped_clip.audio), options=GREEDY,
                                       cancel=token)


def test_silence_gives_an_empty_transcript(model: Any) -> None:
    """Silence has no VAD chunks: an empty result of the usual shape, nothing decoded."""
    silence = np.zeros(5 * 16000, dtype=np.float32)
    result = decoding.transcribe_chunks(model, silence, vad.speech_chunks(silence), options=GREEDY)
    assert result == {"text": "", "segments": [], "language": "en"}


def test_unknown_options_and_bad_batch_sizes_are_refused(
    model: Any, gapped_clip: clips.Clip, chunks: list[Chunk]
) -> None:
    """A misspelt option or a batch size under 1 is a ValueError naming it, not silently ignored."""
    with pytest.raises(ValueError, match="beam_sise"):
        decoding.transcribe_chunks(model, gapped_clip.audio, chunks, options={"beam_sise": 5})
    with pytest.raises(ValueError, match="batch_size"):
        decoding.transcribe_chunks(model, gapped_clip.audio, chunks, batch_size=0)


def test_decode_options_of_the_transcribe_task_are_accepted(model: Any) -> None:
    """The dict TranscribeInput.decode_options() builds, plus task, is valid input as it is."""
    from handler.tasks.transcribe import TranscribeInput

    options = TranscribeInput.model_validate({"audio": "https://example.com/a.mp3"}).decode_options()
    settings = DecodeOptions.from_options(model, {**options, "task": "transcribe"})
    assert settings.temperatures[0] == 0.0 and len(settings.temperatures) == 6
    assert settings.at(0.0).beam_size == 5 and settings.at(0.0).best_of is None
    assert settings.at(0.4).best_of == 5 and settings.at(0.4).beam_size is None
    assert settings.language == "en" and settings.dtype == torch.float32


def test_pipeline_decodes_chunks_with_the_transcribe_options(model: Any, gapped_clip: clips.Clip) -> None:
    """WhisperPipeline.transcribe_chunks takes the task's decode options as whisper.transcribe does."""
    from handler.pipelines.whisper.pipeline import WhisperPipeline
    from handler.tasks.transcribe import TranscribeInput

    options = TranscribeInput.model_validate({"audio": "https://example.com/a.mp3"}).decode_options()
    options.update(GREEDY)
    pipeline = WhisperPipeline(model, "tiny.en", "cpu")
    chunks = vad.fixed_chunks(gapped_clip.audio, max_chunk_s=12.0)
    result = pipeline.transcribe_chunks(gapped_clip.audio, chunks, cancel=CancelToken(), task="transcribe", **options)
    assert media.recognised(result["text"]) >= 0.8, result["text"]


def test_beams_of_a_window_share_its_cross_attention_keys(
    model: Any, gapped_clip: clips.Clip, chunks: list[Chunk], beam_batched: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cross-attention keys are projected once per window, not once per beam (4 rows, not 20), the
    attention's own math path (no SDPA) gives the same tokens, and the model is left as it was."""
    from whisper.model import MultiHeadAttention

    rows: list[int] = []
    block = model.decoder.blocks[0]
    hook = block.cross_attn.key.register_forward_hook(lambda _m, _i, out: rows.append(out.shape[0]))
    monkeypatch.setattr(MultiHeadAttention, "use_sdpa", False)
    try:
        without_sdpa = decoding.transcribe_chunks(model, gapped_clip.audio, chunks, options=BEAM, batch_size=4)
    finally:
        hook.remove()
    assert rows and set(rows) == {4}
    assert _tokens_per_chunk(without_sdpa) == _tokens_per_chunk(beam_batched)
    assert all("qkv_attention" not in vars(b.cross_attn) for b in model.decoder.blocks)


def test_a_single_windows_beams_attend_as_one_row(
    model: Any, gapped_clip: clips.Clip, chunks: list[Chunk], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One window at beam 5 goes through the grouped cross-attention too (5 queries against one
    key row), not upstream's broadcast of one key row over 5 beams (18x slower in torch's CPU
    attention); the tokens are upstream's (test_each_window_of_a_batch_is_decoded_with_its_own_prompt)."""
    shapes: list[tuple[int, int]] = []
    grouped = batch_task._grouped_attention

    def spy(attend: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any = None) -> Any:
        shapes.append((q.shape[0], k.shape[0]))
        return grouped(attend, q, k, v, mask)

    monkeypatch.setattr(batch_task, "_grouped_attention", spy)
    decoding.transcribe_chunks(model, gapped_clip.audio, chunks[:1], options=BEAM, batch_size=1)
    assert set(shapes) == {(1, 1), (5, 1)}  # the prompt's pass on one row per window, then the beams


# Random weights never finish a beam, so upstream's BeamSearchDecoder.finalize takes its path for
# unfinished beams, which calls np.argsort on a tensor (a numpy 2 deprecation inside torch).
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context and return_scalar:DeprecationWarning")
def test_batch_decoding_task_detects_languages_with_beams_on_a_multilingual_model() -> None:
    """With no language given, beams over several windows still detect one language per window.

    A random-weight multilingual model (the real weights here are English-only): only shapes
    and the flow are under test, not what it says.
    """
    from whisper.decoding import DecodingOptions
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1)
    model = Whisper(dims)
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)  # torch.empty otherwise
    options = DecodingOptions(language=None, beam_size=3, sample_len=4, fp16=False)
    results = batch_task.BatchDecodingTask(model, options).run(torch.randn(2, 80, 3000))
    assert len(results) == 2
    assert all(result.language in whisper.tokenizer.LANGUAGES for result in results)


def test_each_window_of_a_batch_is_decoded_with_its_own_prompt(
    model: Any, gapped_clip: clips.Clip, chunks: list[Chunk]
) -> None:
    """Two windows with different prompts in one decoder loop give, each, the tokens of openai-whisper
    decoding it alone with that prompt (and so does one window alone, its beams attending as one
    row); a longer prompt is cut to the shorter one's length, keeping its last tokens; and the
    prompts change what is decoded."""
    tokenizer = whisper.tokenizer.get_tokenizer(False)
    short = tuple(tokenizer.encode(" THE MEETING IS OPEN. HELLO EVERYONE."))
    long = tuple(tokenizer.encode(" the meeting minutes, in lower case, with no full stops at all and the"))
    assert len(long) > len(short)
    mel = whisper.log_mel_spectrogram(gapped_clip.audio, model.dims.n_mels, padding=whisper.audio.N_SAMPLES)
    windows = torch.stack([whisper.pad_or_trim(mel[:, c.start // 160 : c.end // 160], 3000) for c in chunks[:2]])
    settings = DecodeOptions.from_options(model, BEAM)
    with torch.no_grad():
        batched = batch_task.decode_prompted(model, model.encoder(windows), settings, [short, long])
        unprompted = batch_task.decode_prompted(model, model.encoder(windows), settings, [(), ()])
        single = batch_task.decode_prompted(model, model.encoder(windows[:1]), settings, [short])

    def alone(window: torch.Tensor, prompt: tuple[int, ...]) -> tuple[list[int], float]:
        options = whisper.DecodingOptions(language="en", beam_size=5, temperature=0.0, fp16=False, prompt=list(prompt))
        result = whisper.decode(model, window, options)
        return list(result.tokens), round(result.no_speech_prob, 4)

    expected = [alone(windows[0], short), alone(windows[1], long[-len(short):])]
    assert [(r.tokens, round(r.no_speech_prob, 4)) for r in batched] == expected
    assert [(r.tokens, round(r.no_speech_prob, 4)) for r in single] == expected[:1]
    assert [r.tokens for r in batched] != [r.tokens for r in unprompted]


def _window(index: int) -> WindowInput:
    return WindowInput(torch.zeros(1), Window(seek=100 * index, frames=100, end_s=index + 1.0))


def _segment(tokens: list[int], temperature: float = 0.0) -> dict[str, Any]:
    return {"tokens": tokens, "temperature": temperature, "start": 0.0}


def test_sections_prompt_each_window_with_the_text_before_it_in_its_section(model: Any) -> None:
    """Nine windows at width 8: three sections of three, decoded a window of each per round; each
    window is prompted with the initial prompt and the tokens before it in its section, a silent
    window passing its prompt on, and text decoded above temperature 0.5 prompting nothing."""
    settings = DecodeOptions.from_options(model, {})
    sections = Sections([_window(i) for i in range(9)], width=8, options=settings, initial=(7,))
    rounds = []
    while batch := sections.next_round():
        rounds.append({index: window.prompt for index, window in batch})
        for index, _ in batch:
            silent, hot = index == 4, index == 6
            sections.done(index, [] if silent else [_segment([100 + index], 1.0 if hot else 0.0)])
    assert [sorted(found) for found in rounds] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert rounds[0] == {0: (7,), 3: (7,), 6: (7,)}
    assert rounds[1] == {1: (7, 100), 4: (7, 103), 7: ()}
    assert rounds[2] == {2: (7, 100, 101), 5: (7, 103), 8: (107,)}
    assert [segment["tokens"] for segment in sections.segments()] == [[100 + i] for i in range(9) if i != 4]


def test_without_conditioning_every_window_is_in_the_first_round_with_the_initial_prompt(model: Any) -> None:
    settings = DecodeOptions.from_options(model, {"condition_on_previous_text": False})
    sections = Sections([_window(i) for i in range(5)], width=2, options=settings, initial=(7,))
    first = sections.next_round()
    assert [(index, window.prompt) for index, window in first] == [(i, (7,)) for i in range(5)]
    for index, _ in first:
        sections.done(index, [_segment([100 + index])])
    assert sections.next_round() == []


def test_a_long_recording_keeps_full_batches_and_a_short_one_is_one_sequence(model: Any) -> None:
    settings = DecodeOptions.from_options(model, {})

    def widths(count: int) -> list[int]:
        sections = Sections([_window(i) for i in range(count)], width=8, options=settings)
        found = []
        while batch := sections.next_round():
            found.append(len(batch))
            for index, _ in batch:
                sections.done(index, [_segment([1])])
        return found

    assert widths(80) == [8] * 10
    assert widths(2) == [1, 1]
    assert widths(0) == []


def test_the_batch_decoding_task_runs_the_vectorised_steps(model: Any) -> None:
    """BatchDecodingTask puts tests/test_search.py's beam search and timestamp rules in place of
    upstream's (greedy decoding keeps upstream's decoder)."""
    from whisper.decoding import ApplyTimestampRules

    from handler.pipelines.whisper.search import BeamSearch, TimestampRules

    task = batch_task.BatchDecodingTask(model, whisper.DecodingOptions(language="en", beam_size=5, fp16=False))
    assert type(task.decoder) is BeamSearch
    filters = {type(f) for f in task.logit_filters}
    assert TimestampRules in filters and ApplyTimestampRules not in filters
    greedy = batch_task.BatchDecodingTask(model, whisper.DecodingOptions(language="en", fp16=False))
    assert type(greedy.decoder) is not BeamSearch
