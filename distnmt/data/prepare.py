"""``distnmt prepare``: WMT'14 sources -> cleaned, sentencepiece-encoded, sharded token arrays.

Stages, each skipped when its stamp shows it was done before with the same inputs
(so a re-run after a crash, or with only ``max_len`` changed, redoes only what changed):

1. **sources**: registry parts and eval sets from a mirror directory or downloaded
   (:mod:`distnmt.data.fetch`); or, without parts, ``{train_prefix}.{lang}[.gz]``.
2. **clean**: the main process cuts each part into shards of ``shard_size`` pairs
   (raw bytes, no per-line Python work); worker processes decode, clean
   (:mod:`distnmt.data.clean`) and write each shard's text.
3. **dedupe** (optional): exact duplicates over the whole corpus, the first kept,
   in bounded memory (64-bit hashes, processed in buckets).
4. **sample**: a uniform random sample of ``spm_sample_pairs`` cleaned pairs,
   independent of the number of workers.
5. **sentencepiece**: one joint model or one per language, trained on the sample.
6. **encode**: workers encode each shard, drop pairs empty or longer than
   ``max_len`` subwords, and write its token arrays.
7. **dev/test**: raw text (BLEU is scored on it, never cleaned) + encoded source;
   SGML source and reference are matched by document and segment ids.
8. **index, report, manifest**: ``manifest.json`` is written last; its presence
   means "done", and it is deleted first thing, so a failed run is never taken as
   a finished one.

The output layout of ``out_dir`` is :class:`distnmt.data.prepared.PreparedData`'s
(its one owner); ``work/`` holds intermediate text and stamps, reused by re-runs and
safe to delete once prepared (re-runs then redo that work).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

from distnmt.config import DataConfig, TrainConfig, check_data
from distnmt.data import custom
from distnmt.data.clean import DROPPING_RULES, MODIFYING_RULES, CleanRules
from distnmt.data.corpus import read_lines
from distnmt.data.errors import DataError
from distnmt.data.fetch import Fetcher, file_sha256
from distnmt.data.prepared import MANIFEST_VERSION, PreparedData, Split, load_manifest
from distnmt.data.sgml import read_sgml_parallel
from distnmt.data.shards import TokenArrayWriter, ids_path, offsets_path, write_shard_index
from distnmt.io import atomic_open, write_text
from distnmt.data.sources import REGISTRY, Registry, registry_for
from distnmt.data.stages import (
    CleanTask, EncodeTask, SampleTask, SpmTask, Workers, clean_shard, default_workers, encode_shard, in_child,
    init_encoder, make_key, read_stamp, sample_keys, sample_shard, train_models, write_stamp,
)
from distnmt.data.stream import SourceDigest, iter_parallel_blocks
from distnmt.data.tokenizer import Tokenizer

_ENCODE_CHUNK = 10_000  # lines per encode_batch call for dev/test
_DEDUPE_BUCKET = 1 << 22  # hashes sorted at once: about 130 MB of arrays per bucket
__all__ = ["PrepareResult", "clean_rules", "format_report", "load_manifest", "prepare"]


@dataclass
class PrepareResult:
    out_dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Shard:
    """One block of one part as it goes through the stages."""

    name: str
    part: str
    key: str                                  # what its cleaned text depends on
    counts: dict[str, int] = field(default_factory=dict)  # from the clean stage
    drop: Optional[Path] = None               # duplicate positions (dedupe stage)
    duplicates: int = 0
    encoded: dict[str, Any] = field(default_factory=dict)  # from the encode stage

    @property
    def kept(self) -> int:
        return int(self.counts["kept"])


@dataclass
class _Run:
    """What every stage needs to know."""

    prepared: PreparedData
    langs: tuple[str, str]
    rules: CleanRules
    workers: int
    progress: bool
    seed: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.prepared.work_dir

    def say(self, text: str) -> None:
        if self.progress:
            tqdm.write(text, file=sys.stderr)

    def bar(self, desc: str, total: Optional[int], unit: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not self.progress, mininterval=1.0)


# ---------------------------------------------------------------------------- sources


class _SourceCache:
    """sha256 of input files by (path, size, mtime), so a re-run need not read a part to know it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._data = {}

    @staticmethod
    def _stat(file: Path) -> list[int]:
        st = file.stat()
        return [st.st_size, st.st_mtime_ns]

    def get(self, file: Path) -> Optional[str]:
        entry = self._data.get(str(file.resolve()))
        if entry and entry["stat"] == self._stat(file):
            return str(entry["sha256"])
        return None

    def put(self, file: Path, sha256: str) -> None:
        self._data[str(file.resolve())] = {"stat": self._stat(file), "sha256": sha256}
        write_text(self.path, json.dumps(self._data, indent=1, sort_keys=True))


def _train_file(source_dir: Path, prefix: str, lang: str) -> Path:
    """``{prefix}.{lang}.gz``, or the uncompressed file when there is no .gz."""
    gz = source_dir / f"{prefix}.{lang}.gz"
    if gz.exists():
        return gz
    plain = source_dir / f"{prefix}.{lang}"
    if plain.exists():
        return plain
    raise DataError.at(gz, None, f"missing (nor is there {plain.name})")


def _existing(path: Path) -> Path:
    if not path.exists():
        raise DataError.at(path, None, "missing")
    return path


# ---------------------------------------------------------------------------- stage 2: clean


def _clean_stage(
    run: _Run, parts: Sequence[tuple[str, Path, Path]], shard_size: int, limit: Optional[int],
) -> tuple[list[_Shard], dict[str, Any]]:
    """Read every part once, in blocks; workers clean and write each block's text."""
    clean_dir = run.work / "clean"
    clean_dir.mkdir(parents=True, exist_ok=True)
    cache = _SourceCache(run.work / "sources.json")
    rules = run.rules.to_dict()
    shards: list[_Shard] = []
    sources: dict[str, Any] = {}
    part_stamps: list[tuple[Path, str, dict[str, Any]]] = []
    remaining = limit
    bar = run.bar("clean", limit, " pairs")
    with Workers(run.workers) as pool:
        for part, src_file, tgt_file in parts:
            if remaining is not None and remaining <= 0:
                break
            base = ("clean-part", part, shard_size, remaining, rules, run.langs)
            known = (cache.get(src_file), cache.get(tgt_file))
            stamp_path = clean_dir / f"{part}.part.json"
            stamp = read_stamp(stamp_path, make_key(*base, known)) if None not in known else None
            if stamp is not None and all(
                read_stamp(clean_dir / f"{s['name']}.json", s["key"]) and _clean_files(clean_dir, s["name"], run)
                for s in stamp["shards"]
            ):
                part_shards = [_Shard(s["name"], part, s["key"], s["counts"]) for s in stamp["shards"]]
                sources[part] = stamp["source"]
                bar.update(stamp["source"]["lines"])
            else:
                part_shards, sources[part] = _clean_part(run, pool, part, src_file, tgt_file, shard_size, remaining, bar)
                digest = sources[part]
                cache.put(src_file, digest["sha256"][0])
                cache.put(tgt_file, digest["sha256"][1])
                key = make_key(*base, tuple(digest["sha256"]))
                part_stamps.append((stamp_path, key, {"source": digest}))
            shards.extend(part_shards)
            if remaining is not None:
                remaining -= sources[part]["lines"]
        pool.drain()
    bar.close()
    # Part stamps go last: they vouch for every shard of the part, all written by now.
    by_part: dict[str, list[_Shard]] = {}
    for s in shards:
        by_part.setdefault(s.part, []).append(s)
    for path, key, data in part_stamps:
        part = path.name[: -len(".part.json")]
        entries = [{"name": s.name, "key": s.key, "counts": s.counts} for s in by_part[part]]
        write_stamp(path, key, shards=entries, **data)
    return shards, sources


def _clean_files(clean_dir: Path, name: str, run: _Run) -> bool:
    return all((clean_dir / f"{name}.{lang}").is_file() for lang in run.langs) and (
        not run.rules.dedupe or (clean_dir / f"{name}.hash.npy").is_file()
    )


def _clean_part(
    run: _Run, pool: Workers, part: str, src_file: Path, tgt_file: Path, shard_size: int,
    limit: Optional[int], bar: tqdm,
) -> tuple[list[_Shard], dict[str, Any]]:
    clean_dir = run.work / "clean"
    digest = SourceDigest()
    shards: list[_Shard] = []
    for k, block in enumerate(iter_parallel_blocks(src_file, tgt_file, shard_size, limit, digest)):
        name = f"{part}-{k:05d}"
        # The block's bytes, not the file's checksum (known only at its end), key the shard.
        content = hashlib.blake2b(block.src, digest_size=16)
        content.update(block.tgt)
        key = make_key("clean", name, block.first_line, block.count, content.hexdigest(), run.rules.to_dict(), run.langs)
        shard = _Shard(name, part, key)
        shards.append(shard)
        done = read_stamp(clean_dir / f"{name}.json", key)
        if done is not None and _clean_files(clean_dir, name, run):
            shard.counts = done["counts"]
            bar.update(block.count)
            continue

        def finished(result: dict[str, Any], shard: _Shard = shard, n: int = block.count) -> None:
            shard.counts = result["counts"]
            bar.update(n)

        task = CleanTask(name, key, block.src, block.tgt, str(src_file), str(tgt_file), block.first_line,
                         run.rules, str(clean_dir), run.langs)
        pool.submit(clean_shard, task, finished)
    source = {
        "files": [str(src_file), str(tgt_file)],
        "sha256": [digest.src_sha256, digest.tgt_sha256],
        "bytes": [digest.src_size, digest.tgt_size],
        "lines": digest.lines,
    }
    return shards, source


# ---------------------------------------------------------------------------- stage 3: dedupe


def _dedupe_stage(run: _Run, shards: list[_Shard]) -> str:
    """Mark every repeat of an earlier pair (in part, shard, line order); returns the stage key."""
    key = make_key("dedupe", [s.key for s in shards])
    dedupe_dir = run.work / "dedupe"
    stamp = read_stamp(run.work / "dedupe.json", key)
    if stamp is None:
        dedupe_dir.mkdir(parents=True, exist_ok=True)
        counts = _find_duplicates(run.work / "clean", dedupe_dir, shards)
        write_stamp(run.work / "dedupe.json", key, duplicates=counts)
        stamp = {"duplicates": counts}
    for s in shards:
        s.duplicates = int(stamp["duplicates"][s.name])
        s.drop = dedupe_dir / f"{s.name}.npy" if s.duplicates else None
    return key


def _find_duplicates(clean_dir: Path, dedupe_dir: Path, shards: list[_Shard]) -> dict[str, int]:
    """Bounded-memory exact dedupe: hashes are split into buckets by value and each
    bucket sorted on its own; only the duplicates' positions are kept in memory."""
    hashes = [np.load(clean_dir / f"{s.name}.hash.npy", mmap_mode="r") for s in shards]
    starts = np.zeros(len(shards) + 1, dtype=np.int64)
    np.cumsum([len(h) for h in hashes], out=starts[1:])
    buckets = max(1, math.ceil(int(starts[-1]) / _DEDUPE_BUCKET))
    found: list[np.ndarray] = []
    for b in range(buckets):
        values, positions = [], []
        for i, h in enumerate(hashes):
            local = np.flatnonzero(np.asarray(h) % np.uint64(buckets) == np.uint64(b)) if buckets > 1 else np.arange(len(h))
            values.append(np.asarray(h)[local])
            positions.append(local + starts[i])
        v, p = np.concatenate(values), np.concatenate(positions)
        # Positions ascend within equal hashes (shards are concatenated in order and
        # the sort is stable), so every entry after the first of a run is a repeat.
        order = np.argsort(v, kind="stable")
        v, p = v[order], p[order]
        found.append(p[1:][v[1:] == v[:-1]])
    dups = np.sort(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
    counts = {}
    for i, s in enumerate(shards):
        lo, hi = np.searchsorted(dups, [starts[i], starts[i + 1]])
        local = dups[lo:hi] - starts[i]
        counts[s.name] = int(len(local))
        with atomic_open(dedupe_dir / f"{s.name}.npy", "wb") as f:
            np.save(f, local)
    return counts


# ---------------------------------------------------------------------------- stages 4-5: sample, spm


def _sample_stage(run: _Run, shards: list[_Shard], size: int, dedupe_key: str) -> tuple[str, int]:
    """Write a uniform sample of ``size`` cleaned pairs to work/sample; returns (key, pairs)."""
    key = make_key("sample", [s.key for s in shards], dedupe_key, run.seed, size)
    sample_dir = run.work / "sample"
    stamp = read_stamp(run.work / "sample.json", key)
    if stamp is not None and all((sample_dir / f"{s.name}.{lang}").is_file() for s in shards for lang in run.langs):
        return key, int(stamp["pairs"])
    sample_dir.mkdir(parents=True, exist_ok=True)
    # The sample is the `size` pairs with the smallest keys: find the size-th smallest
    # key holding at most `size` keys in memory at any time.
    best = np.zeros(0, dtype=np.uint64)
    for s in shards:
        keys = sample_keys(run.seed, s.name, s.kept)
        if s.drop is not None:
            keys = np.delete(keys, np.load(s.drop))
        if len(best) == size:
            keys = keys[keys < best.max()]
        best = np.concatenate([best, keys])
        if len(best) > size:
            best = np.partition(best, size - 1)[:size]
    threshold = int(best.max()) if len(best) else 0
    total = 0

    def add(n: int) -> None:
        nonlocal total
        total += n

    with Workers(run.workers) as pool:
        for s in shards:
            task = SampleTask(s.name, str(run.work / "clean"), str(sample_dir), run.langs, run.seed, s.kept,
                              str(s.drop) if s.drop else None, threshold)
            pool.submit(sample_shard, task, add)
    write_stamp(run.work / "sample.json", key, pairs=total, threshold=threshold)
    return key, total


def _spm_stage(
    run: _Run, shards: list[_Shard], sample_key: str, vocab_size: int, model_type: str, joint: bool,
) -> dict[str, Tokenizer]:
    """Train sentencepiece on the sample (or reuse the models the stamp vouches for)."""
    src_lang, tgt_lang = run.langs
    key = make_key("spm", sample_key, vocab_size, model_type, joint, run.langs, run.seed)
    models = {lang: run.prepared.spm_model(lang) for lang in run.langs}
    stamp = read_stamp(run.work / "spm.json", key)
    if stamp is not None and all(m.is_file() for m in models.values()):
        tokenizers = {lang: Tokenizer(path) for lang, path in models.items()}
        if all(tok.sha256 == stamp["sha256"][lang] for lang, tok in tokenizers.items()):
            return tokenizers
    if joint:
        run.say(f"training one joint sentencepiece {model_type} model for '{src_lang}'+'{tgt_lang}' (vocab {vocab_size})")
    else:
        run.say(f"training sentencepiece {model_type} models for '{src_lang}' and '{tgt_lang}' (vocab {vocab_size})")
    task = SpmTask(str(run.work / "sample"), [s.name for s in shards], run.langs, run.prepared, str(run.work),
                   vocab_size, model_type, joint, run.seed)
    # In a child process: the trainer holds the whole sample, and memory it frees
    # is not handed back to the OS; kept in this process, every encode worker
    # forked later would start with it.
    in_child(train_models, task)
    tokenizers = {lang: Tokenizer(path) for lang, path in models.items()}
    write_stamp(run.work / "spm.json", key, sha256={lang: tok.sha256 for lang, tok in tokenizers.items()})
    return tokenizers


# ---------------------------------------------------------------------------- stage 6: encode


def _encode_stage(run: _Run, shards: list[_Shard], tokenizers: dict[str, Tokenizer], max_len: int, dedupe_key: str) -> None:
    shard_dir, stamp_dir = run.prepared.shard_dir, run.work / "encode"
    shard_dir.mkdir(parents=True, exist_ok=True)
    spm = {lang: tok.sha256 for lang, tok in tokenizers.items()}
    bar = run.bar("encode", sum(s.kept for s in shards), " pairs")
    with Workers(run.workers, init_encoder, (tokenizers,)) as pool:
        for s in shards:
            key = make_key("encode", s.key, dedupe_key if s.drop else "", spm, max_len, run.langs)
            done = read_stamp(stamp_dir / f"{s.name}.json", key)
            if done is not None and all(ids_path(run.prepared.shard_prefix(s.name, lang)).is_file() for lang in run.langs):
                s.encoded = done
                bar.update(s.kept)
                continue

            def finished(result: dict[str, Any], s: _Shard = s) -> None:
                s.encoded = result
                bar.update(s.kept)

            task = EncodeTask(s.name, key, str(run.work / "clean"), run.prepared, str(stamp_dir), run.langs,
                              str(s.drop) if s.drop else None, max_len)
            pool.submit(encode_shard, task, finished)
    bar.close()


# ---------------------------------------------------------------------------- stage 7: dev/test


def _read_eval_pair(src: Path, ref: Path) -> tuple[list[str], list[str]]:
    """Source and reference lines: SGML (detected by content) matched by ids, plain text by line (same count)."""
    return custom.read_eval_pair(src, ref)


def _write_text_atomic(path: Path, lines: list[str]) -> None:
    write_text(path, "".join(line + "\n" for line in lines))


def _write_eval_split(run: _Run, name: Split, files: Sequence[tuple[Path, Path]], src_tok: Tokenizer) -> int:
    """Raw text of both sides (unchanged) plus the encoded source; returns the segment count."""
    src_lang, tgt_lang = run.langs
    src_lines: list[str] = []
    tgt_lines: list[str] = []
    for src, ref in files:
        s, t = _read_eval_pair(src, ref)
        src_lines += s
        tgt_lines += t
    _write_text_atomic(run.prepared.text(name, src_lang), src_lines)
    _write_text_atomic(run.prepared.text(name, tgt_lang), tgt_lines)
    with TokenArrayWriter(run.prepared.source_ids_prefix(name)) as writer:
        for start in range(0, len(src_lines), _ENCODE_CHUNK):
            writer.append_many(src_tok.encode_batch(src_lines[start:start + _ENCODE_CHUNK]))
        return writer.close()


# ---------------------------------------------------------------------------- stage 8: report, index


def _report(sources: dict[str, Any], shards: list[_Shard], langs: tuple[str, str]) -> dict[str, dict[str, Any]]:
    """Per part: read, kept, pairs changed per modifying rule, pairs dropped per dropping rule,
    and what share each dropping rule took (:func:`_shares`)."""
    report: dict[str, dict[str, Any]] = {}
    for s in shards:
        row = report.setdefault(s.part, {"read": 0, "kept": 0, **{r: 0 for r in MODIFYING_RULES + DROPPING_RULES},
                                         **{f"tokens_{lang}": 0 for lang in langs}})
        row["read"] += s.counts["read"]
        for rule in MODIFYING_RULES + DROPPING_RULES:
            row[rule] += int(s.counts.get(rule, 0)) + int(s.encoded["counts"].get(rule, 0))
        row["kept"] += s.encoded["kept"]
        for lang in langs:
            row[f"tokens_{lang}"] += s.encoded["tokens"][lang]
    total = {k: sum(row[k] for row in report.values()) for k in next(iter(report.values()))}
    report["total"] = total
    for part, row in report.items():
        dropped = sum(row[r] for r in DROPPING_RULES)
        if row["read"] != row["kept"] + dropped:  # a bug in this file, not bad data
            raise AssertionError(f"{part}: read {row['read']} != kept {row['kept']} + dropped {dropped}")
    for row in report.values():
        row.update(_shares(row))
    return report


def _shares(row: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The share of pairs each dropping rule drops, two ways.

    ``dropped_share``: of the pairs read. ``dropped_share_of_reaching``: of the pairs
    still there when the rule runs (rules run in DROPPING_RULES order, a pair counted
    under the first that drops it), i.e. what the rule itself costs on top of the ones
    before it: the 50-subword cap's share of the pairs the paper's 50-word filter keeps.
    """
    reaching = row["read"]
    of_read, of_reaching = {}, {}
    for rule in DROPPING_RULES:
        of_read[rule] = round(row[rule] / row["read"], 6) if row["read"] else 0.0
        of_reaching[rule] = round(row[rule] / reaching, 6) if reaching else 0.0
        reaching -= row[rule]
    return {"dropped_share": of_read, "dropped_share_of_reaching": of_reaching}


def format_report(report: dict[str, dict[str, Any]]) -> str:
    """Two markdown tables, one row per part and the total: the counts, then each
    dropping rule's share (of the pairs read, and of the pairs that reached it)."""
    columns = ["read", "kept", *MODIFYING_RULES, *DROPPING_RULES]
    lines = [
        "| part | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for part, row in report.items():
        name = f"**{part}**" if part == "total" else part
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:,}" for c in columns) + " |")
    lines += [
        "",
        "Share dropped by each rule: % of the pairs read (% of the pairs still there when the rule ran; "
        "rules run left to right, a pair counts under the first that drops it).",
        "",
        "| part | kept | " + " | ".join(DROPPING_RULES) + " |",
        "|---|" + "---:|" * (len(DROPPING_RULES) + 1),
    ]
    for part, row in report.items():
        name = f"**{part}**" if part == "total" else part
        kept = f"{100 * row['kept'] / row['read']:.2f}%" if row["read"] else "-"
        cells = [f"{100 * row['dropped_share'][r]:.2f}% ({100 * row['dropped_share_of_reaching'][r]:.2f}%)"
                 for r in DROPPING_RULES]
        lines.append(f"| {name} | {kept} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, data: Any) -> None:
    # Not io.write_json: its keys are sorted, and the report's parts are in corpus order.
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _prune(folder: Path, keep: set[str]) -> None:
    """Delete files of shards no longer in the output (an earlier config's), and the
    temporary files an interrupted run may have left (never read: only renamed)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and (path.name.split(".", 1)[0] not in keep or path.name.endswith((".tmp", ".scratch"))):
            path.unlink()


# ---------------------------------------------------------------------------- prepare


def clean_rules(data: DataConfig) -> CleanRules:
    """The cleaning rules the data config switches on."""
    return CleanRules(normalize=data.normalize, fold_line_breaks=data.fold_line_breaks, drop_empty=data.drop_empty,
                      max_words=data.max_words, max_ratio=data.max_ratio, dedupe=data.dedupe)


def prepare(
    data: DataConfig, *, seed: int = TrainConfig.seed, progress: bool = True, registry: Optional[Registry] = None,
) -> PrepareResult:
    """Build everything training and evaluation read from ``data.prepared_dir`` (see the module docstring).

    ``data.source_dir`` is a mirror: a directory holding the archives or their
    extracted files; with ``None`` the archives are downloaded into ``data.cache_dir``.
    Training data comes from the registry ``data.parts`` (or a ``data.preset``); with
    neither, from ``{source_dir}/{train_prefix}.{lang}[.gz]``. Dev and test come from
    the registry eval sets ``data.dev_sets`` (concatenated) and ``data.test_set``, or
    else from ``data.dev_prefix`` (plain text) and ``data.test_src``/``data.test_ref``.
    With ``data.corpora``, ``data.dev`` and ``data.test`` (a user's own files,
    :mod:`distnmt.data.custom`), from those instead. Every value is range-checked
    first (:meth:`DataConfig.checks`, ConfigError).

    ``seed`` (the run's ``train.seed``) draws the sentencepiece sample and seeds its
    trainer; ``registry`` is where parts and eval sets are looked up, by default the
    one of the language pair (:func:`registry_for`).
    """
    started = time.monotonic()
    check_data(data)
    out_dir = Path(data.prepared_dir)
    source_dir = Path(data.source_dir) if data.source_dir is not None else None
    src_lang, tgt_lang = data.src_lang, data.tgt_lang
    preset, parts, dev_sets, test_set = data.preset, data.parts, data.dev_sets, data.test_set
    vocab_size, model_type, joint_vocab, max_len = data.vocab_size, data.spm_model_type, data.joint_vocab, data.max_len
    max_train_pairs, spm_sample_pairs, shard_size = data.max_train_pairs, data.spm_sample_pairs, data.shard_size
    rules = clean_rules(data)
    mirror = Path(source_dir).resolve() if source_dir is not None else None
    if mirror is not None and not mirror.is_dir():
        raise DataError.at(mirror, None, "mirror directory not found")
    langs = (src_lang, tgt_lang)

    # ---- 1. sources: everything is located (or downloaded) before any output is touched.
    # A user's own files (issue 17): checked here, TSVs split once the work dir exists.
    own = custom.locate(data.corpora, data.dev, data.test, langs, mirror) if data.corpora is not None else None
    registry_mode = parts is not None or preset is not None
    if registry is None:
        registry = registry_for(src_lang, tgt_lang) if (registry_mode or dev_sets or test_set) else REGISTRY
    if registry_mode or dev_sets or test_set:
        registry.check_langs(src_lang, tgt_lang)
    part_list = registry.resolve_parts(preset, parts) if registry_mode else []
    eval_items = [registry.eval_set(n) for n in (dev_sets or [])] + ([registry.eval_set(test_set)] if test_set else [])
    if mirror is None and not registry_mode and own is None:
        raise DataError("data.source_dir is null (download), which needs data.preset or data.parts")
    fetcher = Fetcher(mirror, Path(data.cache_dir), registry, src_lang, tgt_lang, verify=data.verify_checksums,
                      progress=progress)
    t0 = time.monotonic()
    located = fetcher.fetch([*part_list, *eval_items]) if (part_list or eval_items) else {}
    if own is not None:
        train_parts = []  # after custom.materialize, below
    elif registry_mode:
        train_parts = [(p.name, *located[p.name]) for p in part_list]
    else:
        assert mirror is not None
        train_parts = [("train", _train_file(mirror, data.train_prefix, src_lang),
                        _train_file(mirror, data.train_prefix, tgt_lang))]
    if own is not None:
        dev_files, test_files = [], []  # after custom.materialize, below
    elif mirror is None and not (dev_sets and test_set):
        raise DataError("data.source_dir is null (download), which needs data.dev_sets and data.test_set")
    if own is not None:
        pass
    elif dev_sets:
        dev_files = [located[n] for n in dev_sets]
    else:
        assert mirror is not None
        dev_files = [(_existing(mirror / f"{data.dev_prefix}.{src_lang}"), _existing(mirror / f"{data.dev_prefix}.{tgt_lang}"))]
    if own is not None:
        pass
    elif test_set:
        test_files = [located[test_set]]
    else:
        assert mirror is not None
        test_files = [(_existing(mirror / data.test_src), _existing(mirror / data.test_ref))]

    out_dir.mkdir(parents=True, exist_ok=True)
    prepared = PreparedData(out_dir, src_lang, tgt_lang)
    # An old manifest would vouch for files this run is about to replace.
    prepared.manifest_path.unlink(missing_ok=True)
    run = _Run(prepared, langs, rules, data.workers or default_workers(), progress, seed)
    run.work.mkdir(parents=True, exist_ok=True)
    if own is not None:  # a TSV becomes the two files the stages read
        custom.materialize(own, run.work, langs)
        train_parts = [(c.name, c.src, c.tgt) for c in own.corpora]  # type: ignore[misc]
        dev_files = [(own.dev.src, own.dev.tgt)]  # type: ignore[list-item]
        test_files = [(own.test.src, own.test.tgt)]  # type: ignore[list-item]
    run.timings["sources"] = time.monotonic() - t0

    # ---- 2-6. the training data
    t0 = time.monotonic()
    shards, sources = _clean_stage(run, train_parts, shard_size, max_train_pairs)
    run.timings["clean"] = time.monotonic() - t0
    t0 = time.monotonic()
    dedupe_key = _dedupe_stage(run, shards) if rules.dedupe else ""
    run.timings["dedupe"] = time.monotonic() - t0
    if sum(s.kept - s.duplicates for s in shards) == 0:
        raise DataError.at(train_parts[0][1], None, "no training pairs left after cleaning; see the rules in data: config")
    t0 = time.monotonic()
    sample_key, sampled = _sample_stage(run, shards, spm_sample_pairs, dedupe_key)
    run.timings["sample"] = time.monotonic() - t0
    t0 = time.monotonic()
    tokenizers = _spm_stage(run, shards, sample_key, vocab_size, model_type, joint_vocab)
    run.timings["sentencepiece"] = time.monotonic() - t0
    t0 = time.monotonic()
    _encode_stage(run, shards, tokenizers, max_len, dedupe_key)
    run.timings["encode"] = time.monotonic() - t0

    # ---- 7. dev and test
    t0 = time.monotonic()
    counts: dict[str, int] = {}
    counts["dev"] = _write_eval_split(run, "dev", dev_files, tokenizers[src_lang])
    counts["test"] = _write_eval_split(run, "test", test_files, tokenizers[src_lang])
    run.timings["dev_test"] = time.monotonic() - t0

    # ---- 8. index, report, manifest
    report = _report(sources, shards, langs)
    total = report["total"]
    if total["kept"] == 0:
        raise DataError.at(
            train_parts[0][1], None, f"no training pairs left after filtering {total['read']} (max_len={max_len})"
        )
    shard_dir = prepared.shard_dir
    for lang in langs:
        train = prepared.train_prefix(lang)
        for stale in (ids_path(train), offsets_path(train)):
            stale.unlink(missing_ok=True)  # an older single-array layout would shadow the index
        write_shard_index(train, [
            (prepared.shard_prefix(s.name, lang), s.encoded["kept"], s.encoded["tokens"][lang]) for s in shards
        ])
    names = {s.name for s in shards}
    for folder in (shard_dir, run.work / "clean", run.work / "sample", run.work / "encode", run.work / "dedupe"):
        _prune(folder, names | {p for p, _, _ in train_parts})
    counts = {
        "train_read": total["read"],
        "train": total["kept"],
        **{f"train_tokens_{lang}": total[f"tokens_{lang}"] for lang in langs},
        **counts,
    }
    config = {
        "preset": preset, "parts": list(parts) if parts is not None else None,
        "train_prefix": None if registry_mode else data.train_prefix,
        "dev_sets": list(dev_sets) if dev_sets else None, "test_set": test_set,
        "dev_prefix": None if dev_sets else data.dev_prefix, "test_src": None if test_set else data.test_src,
        "test_ref": None if test_set else data.test_ref, "src_lang": src_lang, "tgt_lang": tgt_lang,
        "vocab_size": vocab_size, "model_type": model_type, "joint_vocab": joint_vocab, "max_len": max_len,
        "max_train_pairs": max_train_pairs, "seed": seed, "spm_sample_pairs": spm_sample_pairs,
        "shard_size": shard_size, "rules": rules.to_dict(), "verify_checksums": data.verify_checksums,
        **({"corpora": [c.describe() for c in own.corpora], "dev": own.dev.describe(), "test": own.test.describe()}
           if own is not None else {}),
    }
    _write_json(prepared.report_json, report)
    write_text(prepared.report_md, format_report(report))
    manifest = {
        "version": MANIFEST_VERSION,
        "src_lang": src_lang,
        "tgt_lang": tgt_lang,
        "vocab_size": vocab_size,
        "model_type": model_type,
        "joint_vocab": joint_vocab,
        "max_len": max_len,
        "max_train_pairs": max_train_pairs,
        "seed": seed,
        "counts": counts,
        "dropped": {rule: total[rule] for rule in DROPPING_RULES},
        "modified": {rule: total[rule] for rule in MODIFYING_RULES},
        "report": report,
        "spm_sha256": {lang: tok.sha256 for lang, tok in tokenizers.items()},
        "spm_sample_pairs": sampled,
        "shards": [
            {"name": s.name, "part": s.part, "pairs": s.encoded["kept"],
             **{f"tokens_{lang}": s.encoded["tokens"][lang] for lang in langs}}
            for s in shards
        ],
        "sources": {
            "train": sources,
            "dev": [[str(a), str(b)] for a, b in dev_files],
            "test": [[str(a), str(b)] for a, b in test_files],
            "sha256": {str(p): file_sha256(p) for pair in (*dev_files, *test_files) for p in pair},
            **fetcher.describe(),
            **({"tsv_sha256": own.tsv_sha256} if own is not None else {}),
        },
        "source_dir": str(mirror) if mirror else None,
        "config": config,
        "workers": run.workers,
        "timings": {k: round(v, 3) for k, v in run.timings.items()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 2),
    }
    _write_json(prepared.manifest_path, manifest)
    if progress:
        tqdm.write(format_report(report), file=sys.stderr)
        tqdm.write(
            f"prepared {counts['train']:,} of {counts['train_read']:,} training pairs in {len(shards)} shard(s), "
            f"dev {counts['dev']}, test {counts['test']} in {out_dir} ({manifest['seconds']:.1f}s)",
            file=sys.stderr,
        )
    return PrepareResult(out_dir=out_dir, manifest=manifest)

