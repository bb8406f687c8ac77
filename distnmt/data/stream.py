"""Reading a parallel corpus in blocks of N aligned lines, fast and in bounded memory.

``prepare`` reads every training pair once, in the main process, and hands blocks
to worker processes. Splitting text into lines in Python would make that one
process the bottleneck, so this module only finds the byte offset of the N-th
``\\n`` (numpy, in C) and passes the raw bytes on; decoding, splitting and
cleaning happen in the workers (see :func:`decode_block`).

Lines split on ``\\n`` only, as in :mod:`distnmt.data.corpus`. While reading, the
bytes of each file *as stored* (compressed or not) are hashed, so the sha256 the
manifest records is the one ``sha256sum`` prints, at no extra pass over the file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from distnmt.data.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_READ_SIZE = 1 << 23  # 8 MiB of decompressed text per read
_READ_ERRORS = (EOFError, OSError, zlib.error)


class _HashingReader(io.RawIOBase):
    """A raw reader that hashes every byte it passes through (the file as stored)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self.sha256.update(memoryview(buffer)[:n])
            self.size += n
        return n or 0

    def drain(self) -> None:
        """Hash what was not read (a limit stopped early, or gzip left a trailer)."""
        while chunk := self._raw.read(_READ_SIZE):
            self.sha256.update(chunk)
            self.size += len(chunk)

    def close(self) -> None:
        self._raw.close()
        super().close()


class LineBlockReader:
    """Takes whole lines from a (possibly gzipped) file, N at a time, as raw bytes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            raw = open(self.path, "rb")
        except FileNotFoundError:
            raise DataError.at(self.path, None, "file not found") from None
        except OSError as exc:
            raise DataError.at(self.path, None, f"cannot open ({exc.strerror})") from None
        gz = self.path.suffix == ".gz" or raw.peek(2)[:2] == _GZIP_MAGIC
        self._hasher = _HashingReader(raw)
        buffered = io.BufferedReader(self._hasher, buffer_size=1 << 20)
        self._f: BinaryIO = gzip.GzipFile(fileobj=buffered, mode="rb") if gz else buffered  # type: ignore[assignment]
        self._buf = b""
        self._eof = False
        self.lines = 0  # lines handed out so far

    def _fill(self) -> None:
        try:
            chunk = self._f.read(_READ_SIZE)
        except _READ_ERRORS as exc:
            # A truncated or corrupt .gz: say how far it got (whole reads succeed or fail,
            # so this is a lower bound), so the user sees the file is cut short.
            good = self.lines + self._buf.count(b"\n")
            raise DataError.at(
                self.path, None, f"cannot read past line {good} (truncated or corrupt?): {type(exc).__name__}: {exc}"
            ) from None
        if chunk:
            self._buf += chunk
        else:
            self._eof = True

    def take(self, n: int) -> tuple[bytes, int]:
        """Up to ``n`` lines (each with its ``\\n``, the last one maybe without); returns (bytes, count)."""
        while self._buf.count(b"\n") < n and not self._eof:
            self._fill()
        newlines = self._buf.count(b"\n")
        if newlines >= n:
            # Offset of the n-th newline, found in C rather than by a Python loop over lines.
            ends = np.flatnonzero(np.frombuffer(self._buf, dtype=np.uint8) == 10)
            cut = int(ends[n - 1]) + 1
            block, self._buf = self._buf[:cut], self._buf[cut:]
            got = n
        else:  # end of file: whatever is left, plus a last line without a newline
            block, self._buf = self._buf, b""
            got = newlines + (1 if block and not block.endswith(b"\n") else 0)
        self.lines += got
        return block, got

    def count_rest(self) -> int:
        """Lines not yet taken (reads to the end)."""
        total = 0
        while True:
            block, got = self.take(1 << 20)
            if not got:
                return total
            total += got

    def finish(self) -> tuple[str, int]:
        """Close; returns (sha256, size) of the file as stored on disk."""
        self._hasher.drain()
        self.close()
        return self._hasher.sha256.hexdigest(), self._hasher.size

    def close(self) -> None:
        self._f.close()
        self._hasher.close()

    def __enter__(self) -> "LineBlockReader":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


@dataclass
class Block:
    """``count`` aligned lines of both sides, starting at 1-based line ``first_line``."""

    src: bytes
    tgt: bytes
    first_line: int
    count: int


@dataclass
class SourceDigest:
    """What :func:`iter_parallel_blocks` learnt about the files it read to the end."""

    src_sha256: str = ""
    tgt_sha256: str = ""
    src_size: int = 0
    tgt_size: int = 0
    lines: int = 0


def iter_parallel_blocks(
    src_path: Path, tgt_path: Path, lines: int, limit: int | None = None, digest: SourceDigest | None = None
) -> Iterator[Block]:
    """Aligned blocks of ``lines`` lines from two files, stopping after ``limit`` lines.

    Raises DataError ``"{shorter}: has N lines but {other} has M"`` when the files
    differ in length (found when the shorter one ends), and ``"{file}: empty"`` for a
    file with no lines. When ``digest`` is given it is filled in at the end with
    the sha256 and size of both files.
    """
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    with LineBlockReader(src_path) as src, LineBlockReader(tgt_path) as tgt:
        first = 1
        while limit is None or first <= limit:
            n = lines if limit is None else min(lines, limit - first + 1)
            s, ns = src.take(n)
            t, nt = tgt.take(n)
            if ns != nt:
                _raise_mismatch(src, tgt, ns, nt)
            if ns == 0:
                break
            yield Block(s, t, first, ns)
            first += ns
            if ns < n:
                # A short block means end of file: check the other side ended too.
                _, extra = tgt.take(1)
                if extra:
                    _raise_mismatch(src, tgt, 0, extra)
                break
        if first == 1:
            raise DataError.at(src_path, None, "empty: no lines to read")
        if digest is not None:
            digest.lines = first - 1
            digest.src_sha256, digest.src_size = src.finish()
            digest.tgt_sha256, digest.tgt_size = tgt.finish()


def _raise_mismatch(src: LineBlockReader, tgt: LineBlockReader, ns: int, nt: int) -> None:
    """Both files read up to the point where one ran out; count the other to the end."""
    if ns < nt:
        shorter, longer = src, tgt
    else:
        shorter, longer = tgt, src
    short_total = shorter.lines
    long_total = longer.lines + longer.count_rest()
    raise DataError.at(shorter.path, None, f"has {short_total} lines but {longer.path} has {long_total}")


def decode_block(data: bytes, path: Path | str, first_line: int) -> list[str]:
    """The lines of a block as str (without ``\\n``); invalid UTF-8 names ``file:line``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        start = data.rfind(b"\n", 0, exc.start) + 1
        raise DataError.at(
            path, line, f"not valid UTF-8 ({exc.reason} at byte {exc.start - start + 1} of the line)"
        ) from None
    if text.endswith("\n"):
        text = text[:-1]
    return text.split("\n")
