"""``distnmt prepare``: raw WMT'14 files -> sentencepiece models + token arrays + manifest.

Output layout of ``out_dir``::

    spm.{src,tgt}.model / .vocab     one sentencepiece model per language
    train.{src,tgt}.{ids,offsets}.npy  filtered, encoded training pairs
    dev.{src}.{ids,offsets}.npy        encoded dev source (every sentence kept)
    test.{src}.{ids,offsets}.npy       encoded test source (every sentence kept)
    dev.{src,tgt}, test.{src,tgt}      raw text, unchanged: BLEU is scored on it
    manifest.json                      written last: its presence means "done"

Training pairs with an empty side, or more than ``max_len`` subwords on either
side, are dropped and counted in the manifest (the paper trains on sentences of
up to 50 words). Dev and test are never filtered: the reported BLEU must cover
every sentence of newstest2014.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distnmt.data.corpus import read_lines, read_parallel
from distnmt.data.errors import DataError
from distnmt.data.shards import TokenArrayWriter
from distnmt.data.tokenizer import Tokenizer, train_sentencepiece

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
_ENCODE_CHUNK = 10_000  # lines per encode_batch call: bounds memory, keeps threads busy
_REQUIRED_KEYS = ("version", "src_lang", "tgt_lang", "vocab_size", "max_len", "counts", "dropped", "spm_sha256")


@dataclass
class PrepareResult:
    out_dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)


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


def _training_side(src: Path, tgt: Path, side: int, limit: int | None) -> Iterator[str]:
    """One side of the training pairs, read through read_parallel so a misaligned corpus fails early."""
    return (pair[side] for pair in itertools.islice(read_parallel(src, tgt), limit))


def _chunks(it: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(it)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _write_text_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line)
            f.write("\n")
    os.replace(tmp, path)


def _encode_train(
    src_file: Path, tgt_file: Path, src_tok: Tokenizer, tgt_tok: Tokenizer, out_dir: Path,
    src_lang: str, tgt_lang: str, max_len: int, limit: int | None, progress: bool,
) -> tuple[dict[str, int], dict[str, int]]:
    """Encode, filter and write the training pairs; returns (counts, dropped)."""
    read = kept = src_tokens = tgt_tokens = 0
    dropped = {"empty": 0, "too_long": 0}
    pairs = itertools.islice(read_parallel(src_file, tgt_file), limit)
    bar = tqdm(total=limit, desc="encode train", unit=" pairs", file=sys.stderr, disable=not progress, mininterval=1.0)
    with TokenArrayWriter(out_dir / f"train.{src_lang}") as src_out, \
            TokenArrayWriter(out_dir / f"train.{tgt_lang}") as tgt_out:
        for chunk in _chunks(pairs, _ENCODE_CHUNK):
            src_ids = src_tok.encode_batch([s for s, _ in chunk])
            tgt_ids = tgt_tok.encode_batch([t for _, t in chunk])
            keep_src, keep_tgt = [], []
            for s, t in zip(src_ids, tgt_ids):
                # A blank side, or one made only of characters the normalizer removes, encodes to nothing.
                if not s or not t:
                    dropped["empty"] += 1
                elif len(s) > max_len or len(t) > max_len:
                    dropped["too_long"] += 1
                else:
                    keep_src.append(s)
                    keep_tgt.append(t)
                    src_tokens += len(s)
                    tgt_tokens += len(t)
            src_out.append_many(keep_src)
            tgt_out.append_many(keep_tgt)
            read += len(chunk)
            kept += len(keep_src)
            bar.update(len(chunk))
        src_out.close()
        tgt_out.close()
    bar.close()
    if kept == 0:
        raise DataError.at(src_file, None, f"no training pairs left after filtering {read} (max_len={max_len})")
    counts = {
        "train_read": read,
        "train": kept,
        f"train_tokens_{src_lang}": src_tokens,
        f"train_tokens_{tgt_lang}": tgt_tokens,
    }
    return counts, dropped


def _write_eval_split(
    name: str, src_file: Path, tgt_file: Path, src_tok: Tokenizer, out_dir: Path,
    src_lang: str, tgt_lang: str, progress: bool,
) -> int:
    """Raw text of both sides (unchanged) plus the encoded source; returns the segment count."""
    src_lines, tgt_lines = read_lines(src_file), read_lines(tgt_file)
    if len(src_lines) != len(tgt_lines):
        shorter, other = (src_file, tgt_file) if len(src_lines) < len(tgt_lines) else (tgt_file, src_file)
        n, m = sorted((len(src_lines), len(tgt_lines)))
        raise DataError.at(shorter, None, f"has {n} lines but {other} has {m}")
    _write_text_atomic(out_dir / f"{name}.{src_lang}", src_lines)
    _write_text_atomic(out_dir / f"{name}.{tgt_lang}", tgt_lines)
    bar = tqdm(total=len(src_lines), desc=f"encode {name}", unit=" lines", file=sys.stderr, disable=not progress)
    with TokenArrayWriter(out_dir / f"{name}.{src_lang}") as writer:
        for chunk in _chunks(src_lines, _ENCODE_CHUNK):
            writer.append_many(src_tok.encode_batch(chunk))
            bar.update(len(chunk))
        n = writer.close()
    bar.close()
    return n


def prepare(
    source_dir: Path,
    out_dir: Path,
    *,
    train_prefix: str = "train/train",
    dev_prefix: str = "dev/newstest2013",
    test_src: str = "test/newstest2014-fren-src.en.sgm",
    test_ref: str = "test/newstest2014-fren-ref.fr.sgm",
    src_lang: str = "en",
    tgt_lang: str = "fr",
    vocab_size: int = 8000,
    model_type: str = "bpe",
    max_len: int = 50,
    max_train_pairs: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> PrepareResult:
    """Build everything training and evaluation read from ``out_dir`` (see the module docstring)."""
    started = time.monotonic()
    source_dir, out_dir = Path(source_dir).resolve(), Path(out_dir)
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if max_train_pairs is not None and max_train_pairs < 1:
        raise ValueError(f"max_train_pairs must be positive, got {max_train_pairs}")
    train_src = _train_file(source_dir, train_prefix, src_lang)
    train_tgt = _train_file(source_dir, train_prefix, tgt_lang)
    dev_src = _existing(source_dir / f"{dev_prefix}.{src_lang}")
    dev_tgt = _existing(source_dir / f"{dev_prefix}.{tgt_lang}")
    test_src_file, test_ref_file = _existing(source_dir / test_src), _existing(source_dir / test_ref)

    out_dir.mkdir(parents=True, exist_ok=True)
    # An old manifest would vouch for files this run is about to replace.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

    tokenizers: dict[str, Tokenizer] = {}
    for side, lang in ((0, src_lang), (1, tgt_lang)):
        if progress:
            tqdm.write(f"training sentencepiece {model_type} model for '{lang}' (vocab {vocab_size})", file=sys.stderr)
        model_path = train_sentencepiece(
            _training_side(train_src, train_tgt, side, max_train_pairs),
            out_dir / f"spm.{lang}",
            vocab_size=vocab_size,
            model_type=model_type,
            seed=seed,
        )
        tokenizers[lang] = Tokenizer(model_path)

    counts, dropped = _encode_train(
        train_src, train_tgt, tokenizers[src_lang], tokenizers[tgt_lang], out_dir,
        src_lang, tgt_lang, max_len, max_train_pairs, progress,
    )
    counts["dev"] = _write_eval_split("dev", dev_src, dev_tgt, tokenizers[src_lang], out_dir, src_lang, tgt_lang, progress)
    counts["test"] = _write_eval_split(
        "test", test_src_file, test_ref_file, tokenizers[src_lang], out_dir, src_lang, tgt_lang, progress
    )

    manifest = {
        "version": MANIFEST_VERSION,
        "src_lang": src_lang,
        "tgt_lang": tgt_lang,
        "vocab_size": vocab_size,
        "model_type": model_type,
        "max_len": max_len,
        "max_train_pairs": max_train_pairs,
        "seed": seed,
        "counts": counts,
        "dropped": dropped,
        "spm_sha256": {lang: tok.sha256 for lang, tok in tokenizers.items()},
        "source_dir": str(source_dir),
        "sources": {
            "train": [str(train_src.relative_to(source_dir)), str(train_tgt.relative_to(source_dir))],
            "dev": [str(dev_src.relative_to(source_dir)), str(dev_tgt.relative_to(source_dir))],
            "test": [test_src, test_ref],
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 2),
    }
    tmp = out_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST_NAME)
    if progress:
        tqdm.write(
            f"prepared {counts['train']} training pairs ({dropped['empty']} empty, {dropped['too_long']} "
            f"longer than {max_len} dropped), dev {counts['dev']}, test {counts['test']} in {out_dir} "
            f"({manifest['seconds']:.1f}s)",
            file=sys.stderr,
        )
    return PrepareResult(out_dir=out_dir, manifest=manifest)


def load_manifest(out_dir: Path) -> dict[str, Any]:
    """Read and check ``out_dir/manifest.json``; DataError naming the file when absent or invalid.

    Also checks that the sentencepiece models on disk are the ones the manifest
    recorded, so training never pairs token arrays with a different vocabulary.
    """
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError.at(path, None, "missing; run `distnmt prepare` first") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError.at(path, exc.lineno, f"invalid JSON ({exc.msg}); re-run `distnmt prepare`") from None
    if not isinstance(manifest, dict):
        raise DataError.at(path, None, "expected a JSON object")
    if manifest.get("version") != MANIFEST_VERSION:
        raise DataError.at(
            path, None, f"version {manifest.get('version')!r} is not supported (expected {MANIFEST_VERSION}); "
            "re-run `distnmt prepare`"
        )
    for key in _REQUIRED_KEYS:
        if key not in manifest:
            raise DataError.at(path, None, f"missing key {key!r}; re-run `distnmt prepare`")
    for lang in (manifest["src_lang"], manifest["tgt_lang"]):
        model = out_dir / f"spm.{lang}.model"
        expected = manifest["spm_sha256"].get(lang)
        try:
            actual = hashlib.sha256(model.read_bytes()).hexdigest()
        except FileNotFoundError:
            raise DataError.at(model, None, "missing; re-run `distnmt prepare`") from None
        if actual != expected:
            raise DataError.at(model, None, f"sha256 {actual[:12]}… does not match {path} ({str(expected)[:12]}…)")
    return manifest
