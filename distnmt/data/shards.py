"""Token-id arrays on disk: one flat id array plus offsets, read by memory map.

``{prefix}.ids.npy`` holds every sequence's ids back to back and
``{prefix}.offsets.npy`` (int64, n+1 entries) where each starts, so sequence i
is ``ids[offsets[i]:offsets[i+1]]``. Memory-mapping means every worker process
shares one page-cache copy instead of unpickling its own, and opening is instant
however large the corpus.

A large corpus is written as many such arrays (shards, one per block of input
pairs, written in parallel) plus ``{prefix}.shards.json`` listing them in order;
``TokenArray(prefix)`` opens either layout and presents one sequence of pairs,
so a trainer never needs to know how the data was split.
"""

from __future__ import annotations

import itertools
import json
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


def index_path(prefix: Path) -> Path:
    """``{prefix}.shards.json``: the shard list of a sharded token array."""
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".shards.json")


SHARD_INDEX_VERSION = 1


def write_shard_index(prefix: Path, shards: Sequence[tuple[Path, int, int]]) -> Path:
    """Publish ``{prefix}.shards.json`` for ``(shard prefix, sequences, tokens)`` in order.

    Shard prefixes are stored relative to the index's folder, so a prepared
    directory can be moved or copied to another machine as a whole.
    """
    prefix = Path(prefix)
    entries = [
        {"prefix": os.path.relpath(Path(p), prefix.parent), "sequences": int(n), "tokens": int(t)} for p, n, t in shards
    ]
    path = index_path(prefix)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": SHARD_INDEX_VERSION, "shards": entries}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


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


def _open_one(prefix: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, offsets) of one array, both memory-mapped, offsets checked."""
    ids_file, off_file = ids_path(prefix), offsets_path(prefix)
    ids = _load_npy(ids_file)
    offsets = np.asarray(_load_npy(off_file), dtype=np.int64)  # int64 on disk: stays a memory map
    if len(offsets) == 0 or offsets[0] != 0:
        raise DataError.at(off_file, None, "corrupt: offsets must start with 0")
    steps = np.diff(offsets)
    if (steps < 0).any():
        bad = int(np.flatnonzero(steps < 0)[0])
        raise DataError.at(off_file, None, f"corrupt: offsets decrease at sequence {bad}")
    if offsets[-1] != len(ids):
        raise DataError.at(
            off_file, None, f"corrupt: last offset is {int(offsets[-1])} but {ids_file.name} has {len(ids)} ids"
        )
    return ids, offsets


def _read_index(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError.at(path, exc.lineno, f"invalid JSON ({exc.msg}); re-run `distnmt prepare`") from None
    if not isinstance(data, dict) or data.get("version") != SHARD_INDEX_VERSION or not isinstance(data.get("shards"), list):
        raise DataError.at(path, None, f"not a version {SHARD_INDEX_VERSION} shard index; re-run `distnmt prepare`")
    return data["shards"]


class TokenArray:
    """Read-only, memory-mapped view of a token array: one array, or a list of shards."""

    lengths: np.ndarray

    def __init__(self, prefix: Path) -> None:
        self.prefix = Path(prefix)
        self._open()

    def _open(self) -> None:
        index = index_path(self.prefix)
        if not ids_path(self.prefix).exists() and index.exists():
            parts = self._open_shards(index)
        else:
            parts = [_open_one(self.prefix)]
        self._ids_parts = [ids for ids, _ in parts]
        self._offsets_parts = [offsets for _, offsets in parts]
        counts = np.array([len(o) - 1 for o in self._offsets_parts], dtype=np.int64)
        self._starts = np.zeros(len(parts) + 1, dtype=np.int64)  # first sequence of each shard
        np.cumsum(counts, out=self._starts[1:])
        lengths = [np.diff(o) for o in self._offsets_parts]
        self.lengths = lengths[0] if len(lengths) == 1 else np.concatenate(lengths)
        self._num_tokens = int(sum(len(ids) for ids in self._ids_parts))

    def _open_shards(self, index: Path) -> list[tuple[np.ndarray, np.ndarray]]:
        parts = []
        for entry in _read_index(index):
            shard = index.parent / entry["prefix"]
            ids, offsets = _open_one(shard)
            if len(offsets) - 1 != entry["sequences"] or len(ids) != entry["tokens"]:
                raise DataError.at(
                    index, None, f"shard {entry['prefix']} has {len(offsets) - 1} sequences and {len(ids)} tokens, "
                    f"not the {entry['sequences']} and {entry['tokens']} listed; re-run `distnmt prepare`"
                )
            parts.append((ids, offsets))
        if not parts:
            raise DataError.at(index, None, "lists no shards; re-run `distnmt prepare`")
        return parts

    @property
    def num_shards(self) -> int:
        return len(self._ids_parts)

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
        if len(self._ids_parts) == 1:
            shard, local = 0, i
        else:
            shard = int(np.searchsorted(self._starts, i, side="right")) - 1
            local = i - int(self._starts[shard])
        offsets = self._offsets_parts[shard]
        return np.array(self._ids_parts[shard][offsets[local]:offsets[local + 1]], dtype=np.int64)

    def gather(self, indices: Sequence[int]) -> list[np.ndarray]:
        """Sequences ``indices`` (any order), one shard lookup for all of them."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self.lengths)):
            raise IndexError(f"sequence index out of range for {len(self.lengths)} sequences in {self.prefix}")
        shards = np.searchsorted(self._starts, idx, side="right") - 1
        out = []
        for i, s in zip(idx.tolist(), shards.tolist()):
            offsets = self._offsets_parts[s]
            local = i - int(self._starts[s])
            out.append(np.asarray(self._ids_parts[s][offsets[local]:offsets[local + 1]], dtype=np.int64))
        return out

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    # Pickle by path: a memory map must be reopened, not copied, in another process.
    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": str(self.prefix)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.prefix = Path(state["prefix"])
        self._open()

    def __repr__(self) -> str:
        return f"TokenArray({str(self.prefix)!r}, n={len(self)}, tokens={self.num_tokens}, shards={self.num_shards})"
