"""Durable file writes and checksums, used by every writer in distnmt.

A crash (SIGKILL, a full disk, a lost node) must never leave half a file where a
reader would take it as whole: every write goes to a temporary name in the same
directory and is renamed into place, which POSIX makes atomic on one filesystem.
The temporary name starts with a dot so that listings (checkpoints, shards) never
see it, and a failed write removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

_CHUNK = 1 << 20  # read files in 1 MiB blocks: checkpoints and corpora can be large


@contextmanager
def atomic_open(path: Path | str, mode: str = "w", encoding: str | None = "utf-8",
                newline: str | None = "\n") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``.

    ``mode`` is "w" (text) or "wb" (binary). On an exception the temporary file is
    removed and ``path`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode {mode!r}: use 'w' or 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = mode == "wb"
    try:
        with os.fdopen(fd, mode, **({} if binary else {"encoding": encoding, "newline": newline})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8, ``\\n`` line ends) atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_json(path: Path | str, data: Any, indent: int | None = 1) -> None:
    """Write ``data`` as JSON (keys sorted, so files diff well) atomically."""
    write_text(path, json.dumps(data, indent=indent, sort_keys=True) + "\n")


def append_line(path: Path | str, line: str) -> None:
    """Append one line durably (fsync): for logs whose every line must survive a crash.

    Appends are not renames: a crash can cut the last line short, so readers of such
    logs skip a final line that does not parse.
    """
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes (cache keys, short ids)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
