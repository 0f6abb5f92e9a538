"""Multipart form bodies, streamed: file parts go to disk in the job's directory as they arrive.

Nothing is held in memory whole: a file part is written chunk by chunk and cut (INPUT_TOO_LARGE)
the moment it passes the limit, and a body whose ``Content-Length`` is already over the limit
is refused before a byte of it is read. Text fields are small and bounded in size and number,
but for the few named as large (OpenAI's ``known_speaker_references[]``: audio as data URLs), which
go to disk like files, each bounded too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from handler.errors import InputTooLarge, InvalidInput, printable

# A form's text fields: at most this many, each at most this long (OpenAI's `prompt` is the longest).
MAX_FIELDS = 32
MAX_FIELD_BYTES = 16 * 1024
# Large text fields (spooled to disk): at most this many parts, each at most this long.
MAX_SPOOLED_PARTS = 4
MAX_SPOOLED_BYTES = 4 * 1024 * 1024
# What a body may carry besides its file: the text fields and the multipart framing.
FORM_OVERHEAD = MAX_FIELDS * (MAX_FIELD_BYTES + 512) + MAX_SPOOLED_PARTS * MAX_SPOOLED_BYTES


@dataclass
class Form:
    """A parsed form: text fields (a name may repeat, as ``timestamp_granularities[]`` does) and files."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    # Large text fields, each part in its own file, in order.
    spooled: dict[str, list[Path]] = field(default_factory=dict)

    def text(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None

    def large_texts(self, name: str) -> list[str]:
        """The parts of the large text field ``name``, in order (each at most MAX_SPOOLED_BYTES)."""
        return [path.read_text(encoding="utf-8", errors="replace") for path in self.spooled.get(name, [])]


def check_length(content_length: str | None, *, max_file_bytes: int) -> None:
    """Refuse a body announced larger than a file of the limit and its form could be; unread."""
    if content_length is None:
        return
    try:
        length = int(content_length)
    except ValueError as exc:
        raise InvalidInput("Content-Length: not a number") from exc
    if length > max_file_bytes + FORM_OVERHEAD:
        raise InputTooLarge(f"file: the request is {length} bytes, the limit is {max_file_bytes} bytes",
                            field="file")


def boundary_of(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidInput("file: the request must be multipart/form-data with a file part", field="file")
    return boundary


class _Receiver:
    """The parser's callbacks: one part at a time, files to ``directory``, everything bounded."""

    def __init__(self, directory: Path, *, file_fields: frozenset[str], max_file_bytes: int,
                 spooled_fields: frozenset[str] = frozenset()) -> None:
        self.form = Form()
        self._directory = directory
        self._file_fields = file_fields
        self._spooled_fields = spooled_fields
        self._spool: IO[bytes] | None = None
        self._max_file_bytes = max_file_bytes
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._text = bytearray()
        self._file: IO[bytes] | None = None
        self._written = 0

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value_part, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._data, "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers, self._text, self._written = {}, bytearray(), 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_part(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if len(self._headers) > 8:
            raise InvalidInput("file: a form part has too many headers", field="file")
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value[:1024])
        self._header_name, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name in self._spooled_fields:
            parts = self.form.spooled.setdefault(self._name, [])
            if sum(len(paths) for paths in self.form.spooled.values()) >= MAX_SPOOLED_PARTS:
                raise InvalidInput(f"{self._name}: at most {MAX_SPOOLED_PARTS} parts", field=self._name)
            path = self._directory / f"field-{len(self.form.spooled)}-{len(parts)}"
            parts.append(path)
            self._spool = path.open("wb")
            return
        if b"filename" not in options:
            return
        if self._name not in self._file_fields:
            raise InvalidInput(f"{printable(self._name)}: a file was sent where none is expected",
                               field=printable(self._name))
        if self._name in self.form.files:
            raise InvalidInput(f"{self._name}: one file only", field=self._name)
        path = self._directory / f"upload-{self._name}"
        self.form.files[self._name] = path
        self._file = path.open("wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._spool is not None:
            self._written += end - start
            if self._written > MAX_SPOOLED_BYTES:
                raise InputTooLarge(f"{self._name}: a part is over the limit of {MAX_SPOOLED_BYTES} bytes",
                                    field=self._name)
            self._spool.write(data[start:end])
            return
        if self._file is not None:
            self._written += end - start
            if self._written > self._max_file_bytes:
                raise InputTooLarge(f"{self._name}: over the limit of {self._max_file_bytes} bytes",
                                    field=self._name)
            self._file.write(data[start:end])
            return
        self._text += data[start:end]
        if len(self._text) > MAX_FIELD_BYTES:
            raise InvalidInput(f"{printable(self._name)}: longer than {MAX_FIELD_BYTES} bytes",
                               field=printable(self._name))

    def _part_end(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
            return
        if self._file is not None:
            self._file.close()
            self._file = None
            return
        if sum(len(values) for values in self.form.fields.values()) >= MAX_FIELDS:
            raise InvalidInput(f"the form has more than {MAX_FIELDS} fields")
        try:
            text = self._text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{printable(self._name)}: not UTF-8 text", field=printable(self._name)) from exc
        self.form.fields.setdefault(self._name, []).append(text)

    def close(self) -> None:
        for part in (self._file, self._spool):
            if part is not None:
                part.close()


async def read_form(
    chunks: AsyncIterator[bytes], content_type: str | None, directory: Path, *,
    file_fields: frozenset[str], max_file_bytes: int, spooled_fields: frozenset[str] = frozenset(),
) -> Form:
    """Parse a multipart body from ``chunks``, its files (and ``spooled_fields``) written to ``directory``
    (the job's)."""
    receiver = _Receiver(directory, file_fields=file_fields, max_file_bytes=max_file_bytes,
                         spooled_fields=spooled_fields)
    parser = MultipartParser(boundary_of(content_type), receiver.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidInput(f"file: the multipart body is malformed ({printable(str(exc))})", field="file") from exc
    finally:
        receiver.close()
    return receiver.form
