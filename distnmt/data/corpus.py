"""Reading raw parallel text: UTF-8, optionally gzipped, one segment per line.

Lines are split on ``\\n`` only. Python's universal-newline reading and
``str.splitlines`` also split on CR, U+2028, U+0085 and friends, which occur
inside real WMT sentences (giga-fren has thousands) and would silently shift one
side of a parallel corpus against the other.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from distnmt.data.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_READ_ERRORS = (UnicodeDecodeError, EOFError, OSError, zlib.error)


def _open_binary(path: Path) -> BinaryIO:
    """Open ``path`` for binary reading, decompressing gzip (by suffix or magic bytes)."""
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise DataError.at(path, None, "file not found") from None
    except OSError as exc:
        raise DataError.at(path, None, f"cannot open ({exc.strerror})") from None
    if path.suffix == ".gz" or raw.peek(2)[:2] == _GZIP_MAGIC:
        # Reopen by name: a GzipFile given a fileobj never closes it.
        raw.close()
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return raw


def _first_bad_utf8_line(path: Path) -> tuple[int, str]:
    """Rescan ``path`` to find the 1-based line of the first invalid UTF-8 byte.

    The fast C decoder reads in blocks and cannot say which line failed, so we only
    pay for a line-by-line scan once we already know the file is bad.
    """
    with _open_binary(path) as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return lineno, f"{exc.reason} at byte {exc.start + 1} of the line"
    return 0, "invalid UTF-8"  # unreachable unless the file changed under us


class _Utf8Text(io.TextIOWrapper):
    """A TextIOWrapper that turns a decode failure into a DataError naming file:line."""

    def __init__(self, buffer: BinaryIO, path: Path) -> None:
        super().__init__(buffer, encoding="utf-8", errors="strict", newline="\n")
        self._path = path

    def _fail(self, exc: Exception) -> DataError:
        if isinstance(exc, UnicodeDecodeError):
            lineno, what = _first_bad_utf8_line(self._path)
            return DataError.at(self._path, lineno, f"not valid UTF-8 ({what})")
        # A truncated or corrupt .gz surfaces as EOFError / BadGzipFile / zlib.error.
        return DataError.at(self._path, None, f"cannot read: {type(exc).__name__}: {exc}")

    def __next__(self) -> str:
        try:
            return super().__next__()
        except _READ_ERRORS as exc:
            raise self._fail(exc) from None

    def readline(self, size: int = -1) -> str:
        try:
            return super().readline(size)
        except _READ_ERRORS as exc:
            raise self._fail(exc) from None

    def read(self, size: int | None = -1) -> str:
        try:
            return super().read(size)
        except _READ_ERRORS as exc:
            raise self._fail(exc) from None

    def readlines(self, hint: int = -1) -> list[str]:
        try:
            return super().readlines(hint)
        except _READ_ERRORS as exc:
            raise self._fail(exc) from None


def open_text(path: Path) -> TextIO:
    """Open a UTF-8 text file (transparently gunzipped) that splits lines on ``\\n`` only.

    Reading a non-UTF-8 file raises DataError naming ``file:line``; a missing file
    raises DataError naming the file.
    """
    path = Path(path)
    return _Utf8Text(_open_binary(path), path)


def _strip_newline(line: str) -> str:
    return line[:-1] if line.endswith("\n") else line


def read_lines(path: Path) -> list[str]:
    """All segments of a file: ``<seg>`` texts for ``.sgm``, else lines without their ``\\n``."""
    path = Path(path)
    if path.suffix == ".sgm":
        # Imported here because sgml.py uses open_text from this module.
        from distnmt.data.sgml import read_sgml_segments

        return read_sgml_segments(path)
    with open_text(path) as f:
        return [_strip_newline(line) for line in f]


def _iter_lines(path: Path) -> Iterator[str]:
    if path.suffix == ".sgm":
        yield from read_lines(path)
        return
    with open_text(path) as f:
        for line in f:
            yield _strip_newline(line)


def read_parallel(src_path: Path, tgt_path: Path) -> Iterator[tuple[str, str]]:
    """Stream aligned ``(src, tgt)`` lines from two files.

    Raises DataError ``"{shorter}: has N lines but {other} has M"`` when the files
    differ in length; that is discovered at the end of the shorter file, after the
    pairs before it have been yielded, so streaming stays bounded in memory.
    """
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    src_lines, tgt_lines = _iter_lines(src_path), _iter_lines(tgt_path)
    n = 0
    while True:
        src, tgt = next(src_lines, None), next(tgt_lines, None)
        if src is None or tgt is None:
            break
        n += 1
        yield src, tgt
    if src is None and tgt is None:
        return
    if src is None:
        longer_total = n + 1 + sum(1 for _ in tgt_lines)
        raise DataError.at(src_path, None, f"has {n} lines but {tgt_path} has {longer_total}")
    longer_total = n + 1 + sum(1 for _ in src_lines)
    raise DataError.at(tgt_path, None, f"has {n} lines but {src_path} has {longer_total}")
