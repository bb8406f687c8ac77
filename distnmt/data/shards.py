"""Token-id arrays on disk: one flat id array plus offsets, read by memory map.

``{prefix}.ids.npy`` holds every sequence's ids back to back and
``{prefix}.offsets.npy`` (int64, n+1 entries) where each starts, so sequence i
is ``ids[offsets[i]:offsets[i+1]]``. Memory-mapping means every worker process
shares one page-cache copy instead of unpickling its own, and opening is instant
however large the corpus.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distnmt.data.errors import DataError

# uint16 halves the file (and page cache) for any vocabulary below 65535 pieces.
_UINT16_LIMIT = 65535
_CHUNK = 65536  # sequences buffered between appends


def ids_path(prefix: Path) -> Path:
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".ids.npy")


def offsets_path(prefix: Path) -> Path:
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".offsets.npy")


class TokenArrayWriter:
    """Appends sequences to a token array with bounded memory; ``close()`` publishes it.

    Ids go to a raw int32 scratch file first because the final dtype (uint16 or
    int32) is only known once the largest id has been seen. Both .npy files are
    written under temporary names and renamed at the end, so a crash never leaves
    a half-written array under the real name.
    """

    def __init__(self, prefix: Path) -> None:
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._scratch_path = self.prefix.with_name(self.prefix.name + ".ids.scratch")
        self._scratch = open(self._scratch_path, "wb")
        self._lengths: list[np.ndarray] = []  # int32 per chunk: 4 bytes a sequence
        self._num_ids = 0
        self._max_id = -1
        self._closed = False

    def append_many(self, seqs: Iterable[Sequence[int]]) -> None:
        """Append sequences (any iterable of int sequences)."""
        it = iter(seqs)
        while chunk := list(itertools.islice(it, _CHUNK)):
            lengths = np.fromiter((len(s) for s in chunk), dtype=np.int64, count=len(chunk))
            total = int(lengths.sum())
            flat = np.fromiter(itertools.chain.from_iterable(chunk), dtype=np.int64, count=total)
            if total:
                lo, hi = int(flat.min()), int(flat.max())
                if lo < 0 or hi > np.iinfo(np.int32).max:
                    raise ValueError(f"{self.prefix}: token id {lo if lo < 0 else hi} out of range")
                self._max_id = max(self._max_id, hi)
                self._scratch.write(flat.astype(np.int32).tobytes())
            self._lengths.append(lengths.astype(np.int32))
            self._num_ids += total

    def append(self, seq: Sequence[int]) -> None:
        self.append_many([seq])

    def close(self) -> int:
        """Write the final .npy files; returns the number of sequences."""
        if self._closed:
            raise ValueError(f"{self.prefix}: writer already closed")
        self._closed = True
        self._scratch.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        dtype = np.uint16 if self._max_id < _UINT16_LIMIT else np.int32
        ids_final, off_final = ids_path(self.prefix), offsets_path(self.prefix)
        ids_tmp = ids_final.with_name(ids_final.name + ".tmp")
        off_tmp = off_final.with_name(off_final.name + ".tmp")
        scratch = np.memmap(self._scratch_path, dtype=np.int32, mode="r") if self._num_ids else np.zeros(0, np.int32)
        out = np.lib.format.open_memmap(ids_tmp, mode="w+", dtype=dtype, shape=(self._num_ids,))
        step = 1 << 24  # convert in 64 MiB slices so memory stays bounded
        for start in range(0, self._num_ids, step):
            out[start:start + step] = scratch[start:start + step]
        out.flush()
        del out, scratch
        with open(off_tmp, "wb") as f:
            np.save(f, offsets)
        os.replace(ids_tmp, ids_final)
        os.replace(off_tmp, off_final)
        self._scratch_path.unlink()
        return len(lengths)

    def __enter__(self) -> "TokenArrayWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            if not self._closed:
                self.close()
        else:  # leave nothing half-written behind
            self._scratch.close()
            self._scratch_path.unlink(missing_ok=True)


def write_token_array(prefix: Path, seqs: Iterable[Sequence[int]]) -> int:
    """Write ``{prefix}.ids.npy`` and ``{prefix}.offsets.npy`` from a stream of sequences.

    ids are uint16 when every id is below 65535, else int32; memory stays bounded
    (4 bytes per sequence plus one chunk). Returns the number of sequences.
    """
    with TokenArrayWriter(prefix) as writer:
        writer.append_many(seqs)
        return writer.close()


def _load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError.at(path, None, "missing; run `distnmt prepare` first") from None
    except (ValueError, OSError, EOFError) as exc:
        reason = " ".join(str(exc).split())
        raise DataError.at(path, None, f"not a readable .npy array ({reason})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError.at(path, None, f"expected a 1-d integer array, got {arr.dtype} of shape {arr.shape}")
    return arr


class TokenArray:
    """Read-only, memory-mapped view of a token array written by ``write_token_array``."""

    lengths: np.ndarray

    def __init__(self, prefix: Path) -> None:
        self.prefix = Path(prefix)
        self._open()

    def _open(self) -> None:
        ids_file, off_file = ids_path(self.prefix), offsets_path(self.prefix)
        self._ids = _load_npy(ids_file)
        offsets = np.asarray(_load_npy(off_file), dtype=np.int64)  # small: read it whole
        if len(offsets) == 0 or offsets[0] != 0:
            raise DataError.at(off_file, None, "corrupt: offsets must start with 0")
        steps = np.diff(offsets)
        if (steps < 0).any():
            bad = int(np.flatnonzero(steps < 0)[0])
            raise DataError.at(off_file, None, f"corrupt: offsets decrease at sequence {bad}")
        if offsets[-1] != len(self._ids):
            raise DataError.at(
                off_file, None, f"corrupt: last offset is {int(offsets[-1])} but {ids_file.name} has {len(self._ids)} ids"
            )
        self._offsets = offsets
        self.lengths = steps

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        """Sequence ``i`` as a fresh int64 array (safe to modify, detached from the map)."""
        n = len(self.lengths)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences in {self.prefix}")
        return np.array(self._ids[self._offsets[i]:self._offsets[i + 1]], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    # Pickle by path: a memory map must be reopened, not copied, in another process.
    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": str(self.prefix)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.prefix = Path(state["prefix"])
        self._open()

    def __repr__(self) -> str:
        return f"TokenArray({str(self.prefix)!r}, n={len(self)}, tokens={self.num_tokens})"
