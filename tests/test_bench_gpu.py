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
    assert parts == {"preflight", "tests", "whisper", "image", "video"}, rows
    assert not [row for row in rows if "| failed |" in row], rows
    assert any("RTF" in row for row in rows) and any("step (2 passes)" in row for row in rows)
