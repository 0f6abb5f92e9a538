"""The weights-hash memo: remembered for weights, never for job media, and bounded."""

from __future__ import annotations

from pathlib import Path

from handler.runtime import identity


def test_media_hashes_are_not_remembered_and_the_memo_is_bounded(tmp_path: Path, monkeypatch) -> None:
    """A job's media (remember=False) leaves no entry; weights files are remembered, the least
    recently used dropped past the bound, so the memo of a long-lived worker stays small."""
    monkeypatch.setattr(identity, "_known", identity.OrderedDict())
    monkeypatch.setattr(identity, "_KNOWN_MAX", 3)
    files = []
    for number in range(6):
        path = tmp_path / f"f{number}.bin"
        path.write_bytes(bytes([number]) * 10)
        files.append(path)
    media = identity.file_identity(files[0], remember=False)
    assert len(identity._known) == 0
    assert media == identity.file_identity(files[0])  # the same hash either way
    for path in files[1:]:
        identity.file_identity(path)
    assert len(identity._known) == 3
    assert [Path(marker[0]).name for marker in identity._known] == ["f3.bin", "f4.bin", "f5.bin"]
