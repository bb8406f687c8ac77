"""The per-shard work of ``prepare``, run in worker processes, and the pool that runs it.

A shard is one block of ``shard_size`` consecutive input pairs of one part. Each
function here handles one shard on its own, reads and writes only that shard's
files (always under temporary names, renamed when complete) and returns small
counts, so shards run on any number of processes in any order and give the same
bytes. Each one ends by writing the shard's stamp (see :func:`write_stamp`): a
later run that computes the same key skips the shard.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from distnmt.data.clean import CleanRules, clean_block, pair_hashes
from distnmt.data.prepared import PreparedData
from distnmt.data.shards import TokenArrayWriter
from distnmt.data.stream import decode_block
from distnmt.data.tokenizer import Tokenizer, train_sentencepiece
from distnmt.io import write_bytes

# ---------------------------------------------------------------------------- keys and stamps


def make_key(*parts: Any) -> str:
    """A stable digest of JSON-able inputs: what a stage's output depends on."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_stamp(path: Path, key: str) -> Optional[dict[str, Any]]:
    """The stamp's data when it exists and was written for ``key``, else None."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def write_stamp(path: Path, key: str, **data: Any) -> None:
    """Written last, atomically: its presence with the right key means "this is done"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, **data}, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_lines(path: Path, lines: list[str]) -> None:
    """One line each, ``\\n``-terminated, under a temporary name until complete."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        if lines:
            f.write("\n".join(lines))
            f.write("\n")
    os.replace(tmp, path)


def read_text_lines(path: Path) -> list[str]:
    """Lines written by :func:`write_lines` (our own files: no checks needed)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        text = f.read()
    return text[:-1].split("\n") if text else []


# ---------------------------------------------------------------------------- sample keys

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each value (SplitMix64's finalizer), vectorised."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def sample_keys(seed: int, shard_name: str, n: int) -> np.ndarray:
    """A pseudo-random 64-bit key per pair of a shard; the smallest keys form the sample.

    A key depends only on (seed, shard, position), never on which process or in
    which order shards are handled, so the sample is the same for any number of
    workers; taking the k smallest over all shards is a uniform sample of k pairs.
    """
    salt = int.from_bytes(hashlib.blake2b(f"{seed}:{shard_name}".encode(), digest_size=8).digest(), "little")
    return _splitmix64(np.arange(n, dtype=np.uint64) ^ np.uint64(salt))


# ---------------------------------------------------------------------------- tasks


@dataclass
class CleanTask:
    name: str
    key: str
    src: bytes
    tgt: bytes
    src_path: str
    tgt_path: str
    first_line: int
    rules: CleanRules
    work: str
    langs: tuple[str, str]


def clean_shard(task: CleanTask) -> dict[str, Any]:
    """Decode, clean and write one shard's text (and pair hashes when deduplicating)."""
    src = decode_block(task.src, task.src_path, task.first_line)
    tgt = decode_block(task.tgt, task.tgt_path, task.first_line)
    if len(src) != len(tgt):  # cannot happen: blocks are cut by line count
        raise AssertionError(f"{task.name}: {len(src)} != {len(tgt)} lines")
    keep_src, keep_tgt, counts = clean_block(src, tgt, task.rules)
    work = Path(task.work)
    write_lines(work / f"{task.name}.{task.langs[0]}", keep_src)
    write_lines(work / f"{task.name}.{task.langs[1]}", keep_tgt)
    if task.rules.dedupe:
        hashes = work / f"{task.name}.hash.npy"
        tmp = hashes.with_name(hashes.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, pair_hashes(keep_src, keep_tgt))
        os.replace(tmp, hashes)
    write_stamp(work / f"{task.name}.json", task.key, counts=counts)
    return {"name": task.name, "counts": counts}


@dataclass
class SampleTask:
    name: str
    clean_dir: str
    sample_dir: str
    langs: tuple[str, str]
    seed: int
    kept: int
    drop: Optional[str]   # .npy of duplicate positions to skip, if any
    threshold: int        # keys <= threshold are in the sample


def sample_shard(task: SampleTask) -> int:
    """Write the shard's sampled pairs (for sentencepiece); returns how many."""
    keys = sample_keys(task.seed, task.name, task.kept)
    chosen = keys <= np.uint64(task.threshold)
    if task.drop is not None:
        chosen[np.load(task.drop)] = False
    picked = np.flatnonzero(chosen).tolist()
    for lang in task.langs:
        lines = read_text_lines(Path(task.clean_dir) / f"{task.name}.{lang}") if picked else []
        write_lines(Path(task.sample_dir) / f"{task.name}.{lang}", [lines[i] for i in picked])
    return len(picked)


@dataclass
class EncodeTask:
    name: str
    key: str
    clean_dir: str
    prepared: PreparedData  # where the shard's token arrays go
    stamp_dir: str
    langs: tuple[str, str]
    drop: Optional[str]
    max_len: int


_TOKENIZERS: dict[str, Tokenizer] = {}
_ENCODE_CHUNK = 10_000  # pairs per encode_batch call


def init_encoder(tokenizers: dict[str, Tokenizer]) -> None:
    """Pool initializer: one single-threaded tokenizer per language in each worker process."""
    for lang, tok in tokenizers.items():
        tok = copy.copy(tok)  # run inline, the caller's tokenizer must keep its threads
        tok.num_threads = 1  # the pool already uses every core; more threads would fight
        _TOKENIZERS[lang] = tok


def encode_shard(task: EncodeTask) -> dict[str, Any]:
    """Encode one cleaned shard, drop empty and over-long pairs, write its token arrays.

    Encodes ``_ENCODE_CHUNK`` pairs at a time: sentencepiece returns Python lists of
    ints, about 60 bytes a token, so a whole shard at once would need hundreds of MB
    per worker process.
    """
    src_lang, tgt_lang = task.langs
    src = read_text_lines(Path(task.clean_dir) / f"{task.name}.{src_lang}")
    tgt = read_text_lines(Path(task.clean_dir) / f"{task.name}.{tgt_lang}")
    counts = {"duplicate": 0, "empty": 0, "too_long": 0}
    if task.drop is not None:
        drop = set(np.load(task.drop).tolist())
        counts["duplicate"] = len(drop)
        src = [s for i, s in enumerate(src) if i not in drop]
        tgt = [t for i, t in enumerate(tgt) if i not in drop]
    # Every whitespace-separated word is at least one subword, so a side with more
    # than max_len words is too long without encoding it: on WMT that spares
    # sentencepiece a good part of its work, the costliest step of prepare.
    short = [i for i, (s, t) in enumerate(zip(src, tgt)) if len(s.split()) <= task.max_len >= len(t.split())]
    counts["too_long"] = len(src) - len(short)
    kept = 0
    tokens = {src_lang: 0, tgt_lang: 0}
    with TokenArrayWriter(task.prepared.shard_prefix(task.name, src_lang)) as src_out, \
            TokenArrayWriter(task.prepared.shard_prefix(task.name, tgt_lang)) as tgt_out:
        for start in range(0, len(short), _ENCODE_CHUNK):
            chunk = short[start:start + _ENCODE_CHUNK]
            src_ids = _TOKENIZERS[src_lang].encode_batch([src[i] for i in chunk])
            tgt_ids = _TOKENIZERS[tgt_lang].encode_batch([tgt[i] for i in chunk])
            keep_src, keep_tgt = [], []
            for s, t in zip(src_ids, tgt_ids):
                # A side made only of characters the normalizer removes encodes to nothing.
                if not s or not t:
                    counts["empty"] += 1
                elif len(s) > task.max_len or len(t) > task.max_len:
                    counts["too_long"] += 1
                else:
                    keep_src.append(s)
                    keep_tgt.append(t)
                    tokens[src_lang] += len(s)
                    tokens[tgt_lang] += len(t)
            src_out.append_many(keep_src)
            tgt_out.append_many(keep_tgt)
            kept += len(keep_src)
        src_out.close()
        tgt_out.close()
    result = {"kept": kept, "counts": counts, "tokens": tokens}
    write_stamp(Path(task.stamp_dir) / f"{task.name}.json", task.key, **result)
    return {"name": task.name, **result}


@dataclass
class SpmTask:
    sample_dir: str
    shards: list[str]
    langs: tuple[str, str]
    prepared: PreparedData  # where the models go
    work: str
    vocab_size: int
    model_type: str
    joint: bool
    seed: int


def train_models(task: SpmTask) -> None:
    """Train each language's sentencepiece model (one joint model copied under both names, or one per language)."""
    sample_dir, work = Path(task.sample_dir), Path(task.work)

    def lines(*langs: str) -> Iterator[str]:
        for lang in langs:
            for name in task.shards:
                yield from read_text_lines(sample_dir / f"{name}.{lang}")

    # input_sentence_size=0: use every sentence given; the sample is already drawn.
    common: dict[str, Any] = dict(vocab_size=task.vocab_size, model_type=task.model_type, seed=task.seed,
                                  input_sentence_size=0)
    if task.joint:
        model = train_sentencepiece(lines(*task.langs), work / "spm.joint", **common)
        for lang in task.langs:
            for built, dest in ((model, task.prepared.spm_model(lang)), (model.with_suffix(".vocab"), task.prepared.spm_vocab(lang))):
                write_bytes(dest, built.read_bytes())
    else:
        for lang in task.langs:
            train_sentencepiece(lines(lang), task.prepared.spm_prefix(lang), **common)


# ---------------------------------------------------------------------------- the pool


def default_workers() -> int:
    """Cores this process may use (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def in_child(fn: Callable[[Any], Any], arg: Any) -> Any:
    """``fn(arg)`` in a fresh child process; its memory goes back to the OS when it exits.

    The child starts the way every pool worker does (:func:`_pool`): leaving the
    ``with`` block terminates it, and a forked child that kept a Python SIGTERM handler
    (``ray.init`` leaves one in its process) once outlived that, with the parent
    waiting in ``join()`` forever (the suite's test_own_data, after in-process Ray runs).
    """
    with _pool(1) as pool:
        return pool.apply(fn, (arg,))


# Signals that may reach a pool worker before it has run a line of its own:
# Pool.terminate() (SIGTERM) and Ctrl-C (SIGINT, to the whole process group).
_HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_held(signals: Iterable[int]) -> Iterator[None]:
    """Block ``signals`` in this thread; on exit, deliver any that came meanwhile.

    Threads and forked children started inside inherit the block. A child forked
    while they were deliverable could run the parent's Python handler for one before
    it reached its own code, at ``os.fork()``'s return in multiprocessing, outside the
    ``try`` that ends a worker with ``os._exit``: the child then unwound the parent's
    stack as if it were the parent. Seen in the suite: ``Pool.terminate()`` right
    after the pool forked; the new worker ran ``ray.init``'s SIGTERM handler
    (``sys.exit``) and went on running the rest of pytest as a second copy.
    """
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: nothing forks here
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _pool(processes: int, initializer: Optional[Callable[..., None]] = None, initargs: tuple = ()) -> Any:
    """A ``multiprocessing.Pool`` whose workers run :func:`_start_worker` first.

    Forked where the platform can (workers start in milliseconds and inherit the
    loaded modules). The pool is made with SIGINT and SIGTERM held, so that its
    workers and its helper threads (which fork the replacement of a worker that
    died) start with them held too; each worker lets them through once it is in
    its own code.
    """
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with _signals_held(_HELD):
        return multiprocessing.get_context(method).Pool(processes, _start_worker, (initializer, initargs))


def _start_worker(initializer: Optional[Callable[..., None]], initargs: tuple) -> None:
    """First thing in each pool worker: SIGTERM kills it, as ``Pool.terminate()`` expects.

    A forked worker inherits its parent's Python-level SIGTERM handler (``ray.init``
    leaves one behind in the process that called it). With such a handler a worker
    blocked on the task queue's lock outlived ``terminate()`` and ``join()`` waited
    forever: seen when ``prepare`` failed on bad input in a process that had run
    training before (the test suite hung there). SIGINT gets Python's own handler,
    not whatever the parent installed: Ctrl-C stops a worker's task with
    KeyboardInterrupt. Both were held since the fork (:func:`_pool`); one that came
    meanwhile is delivered here.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
    if initializer is not None:
        initializer(*initargs)


class Workers:
    """A process pool with a bounded queue; results come back in submission order.

    ``Pool.imap`` would read its whole input ahead, which for blocks of a corpus
    means the whole corpus in memory; here at most ``2 * processes`` tasks are in
    flight, so memory stays bounded however long the input. With one process the
    work runs inline, which keeps small runs and tests free of process overhead.
    """

    def __init__(self, processes: int, initializer: Optional[Callable[..., None]] = None, initargs: tuple = ()) -> None:
        self.processes = max(1, processes)
        self._pending: deque[tuple[Any, Callable[[Any], None]]] = deque()
        self._pool = None
        if self.processes > 1:
            self._pool = _pool(self.processes, initializer, initargs)
        elif initializer is not None:
            initializer(*initargs)

    def submit(self, fn: Callable[[Any], Any], arg: Any, done: Callable[[Any], None]) -> None:
        if self._pool is None:
            done(fn(arg))
            return
        self._pending.append((self._pool.apply_async(fn, (arg,)), done))
        while len(self._pending) > 2 * self.processes:
            self._collect_one()

    def _collect_one(self) -> None:
        result, done = self._pending.popleft()
        done(result.get())

    def drain(self) -> None:
        while self._pending:
            self._collect_one()

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self._pool is None:
            return
        if exc_type is None:
            self.drain()
            self._pool.close()
        elif issubclass(exc_type, Exception):
            # An error (bad input, found here or by a worker): let the tasks in flight
            # finish (at most 2 * processes, each one block) and drop their results.
            # Not Pool.terminate(): its task handler may start writing a task after
            # terminate() has emptied the task pipe for the last time; a task is a
            # block of the corpus, far larger than a pipe holds, no worker reads it
            # any more, and terminate() waits for that handler forever (seen once in
            # the suite: `prepare` on bad input hung until pytest's timeout).
            for result, _ in self._pending:
                result.wait()
            self._pending.clear()
            self._pool.close()
        else:  # Ctrl-C or exit: the workers got the signal too, and a task of theirs may never end
            self._pool.terminate()
        self._pool.join()
