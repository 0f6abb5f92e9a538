"""The GPU run-book's harness itself, on the CPU: `BENCH_GPU_DRY_RUN=1 make bench-gpu` at tiny shapes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_a_table_in_under_two_minutes(tmp_path: Path) -> None:
    """Every part runs (or stops at its budget) and the table replaces only the GPU section of the
    results file, written to a copy rather than the committed bench/RESULTS.md."""
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\nkept\n\n## GPU run-book\n\n<!-- bench-gpu:start -->\nold\n"
                   "<!-- bench-gpu:end -->\n\nafter\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "BENCH_GPU_DRY_RUN": "1"})
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-2000:]
    assert elapsed < 120, elapsed
    text = out.read_text()
    assert text.startswith("# Results\n\nkept\n") and text.rstrip().endswith("after") and "\nold\n" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| part", "| ---"))]
    parts = {row.split(" | ")[0].removeprefix("| ") for row in rows}
    assert parts == {"preflight", "tests", "whisper", "image", "video", "memory"}, rows
    assert not [row for row in rows if "| failed |" in row], rows
    assert any("RTF" in row for row in rows) and any("step (2 passes)" in row for row in rows)
    assert any(row.startswith("| tests | ") and "SKIPPED" in row for row in rows), rows  # a row per outcome


def test_the_tests_part_lists_each_test(tmp_path: Path) -> None:
    """pytest's -rA summary becomes one row a test, outcome and reason ('|' kept out of the table)."""
    from bench.gpu import pytest_outcomes

    stdout = ("..F\n=== short test summary info ===\nPASSED tests/test_gpu.py::test_memory_goes_back_after_a_job\n"
              "FAILED tests/test_gpu.py::test_slots_are_sized_from_free_vram[0.1] - assert 7 == 8 | x\n"
              "SKIPPED [5] tests/test_gpu.py:24: needs a CUDA GPU\n1 failed, 1 passed, 5 skipped in 3.2s\n")
    assert pytest_outcomes(stdout) == [
        ("PASSED", "test_memory_goes_back_after_a_job", ""),
        ("FAILED", "test_slots_are_sized_from_free_vram[0.1]", "assert 7 == 8 / x"),
        ("SKIPPED", "[5] tests/test_gpu.py:24: needs a CUDA GPU", ""),
    ]


def test_bundle_size_rules(tmp_path: Path) -> None:
    """The weights travel only with room to spare under the 64 MiB the device takes; sizes count files."""
    from bench import gpu_bundle

    mib = 2**20
    assert gpu_bundle.fits(1 * mib, 12 * mib, 37 * mib)
    assert not gpu_bundle.fits(1 * mib, 27 * mib, 37 * mib)  # botocore whole: no room for the weights
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1" * 1000)
    (tmp_path / "y").write_bytes(b"2" * 24)
    assert gpu_bundle.size(tmp_path) == 1024 and gpu_bundle.size(tmp_path / "y") == 24
    assert gpu_bundle.tree_bytes() < 8 * mib  # the tree itself leaves the room to the bundle


def test_botocore_keeps_only_s3_and_sts(tmp_path: Path) -> None:
    import zipfile

    from bench.gpu_bundle import slim_botocore

    wheel = tmp_path / "botocore-1.0-py3-none-any.whl"
    names = ["botocore/__init__.py", "botocore/data/endpoints.json", "botocore/data/s3/2006-03-01/service-2.json",
             "botocore/data/sts/2011-06-15/service-2.json", "botocore/data/ec2/2016-11-15/service-2.json"]
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in names:
            archive.writestr(name, "{}")
        archive.writestr("botocore-1.0.dist-info/RECORD", "".join(f"{n},sha256=x,2\n" for n in names))
    slim_botocore(wheel)
    with zipfile.ZipFile(wheel) as archive:
        kept = sorted(archive.namelist())
        record = archive.read("botocore-1.0.dist-info/RECORD").decode()
    assert kept == sorted([*names[:4], "botocore-1.0.dist-info/RECORD"])
    assert "ec2" not in record and "s3/2006-03-01" in record


def test_int8_weights_come_back_close(tmp_path: Path) -> None:
    """The int8 copy of a checkpoint: matrices within half a step of their row's scale, the rest as they were."""
    import torch

    from bench.gpu_bundle import compact_weights, expand_weights

    torch.manual_seed(0)
    state = {"w": torch.randn(64, 32).half(), "b": torch.randn(64).half()}
    torch.save({"dims": {"n_mels": 80}, "model_state_dict": state, "alignment_heads": b"heads"}, tmp_path / "c.pt")
    compact_weights(tmp_path / "c.pt", tmp_path / "c8.pt")
    back = expand_weights(torch.load(tmp_path / "c8.pt", weights_only=True))
    assert back["dims"] == {"n_mels": 80} and back["alignment_heads"] == b"heads"
    assert torch.equal(back["model_state_dict"]["b"], state["b"])
    step = state["w"].float().abs().amax(dim=1, keepdim=True) / 127
    error = (back["model_state_dict"]["w"].float() - state["w"].float()).abs()
    assert back["model_state_dict"]["w"].dtype == torch.float16 and bool((error <= step * 0.51 + 1e-3).all())
    assert (tmp_path / "c8.pt").stat().st_size < (tmp_path / "c.pt").stat().st_size
