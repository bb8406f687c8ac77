"""Your own parallel text: ``data.corpora``, ``data.dev`` and ``data.test`` instead of the registry.

Each entry is two aligned files (``src``, ``tgt``: plain UTF-8 text, one segment per
line, gzipped or not) or one two-column TSV (``source<TAB>target``; ``columns``
says which language each column holds when it is not ``[src_lang, tgt_lang]``).
Dev and test may also be WMT-style SGML, recognised by content (a ``<srcset``,
``<refset`` or ``<doc`` first tag), and are then matched by document and segment
ids as the newstest sets are. Any language codes work: they only name files.

From there the files go through the very stages the WMT corpora go through
(cleaning rules, report, sentencepiece, shards, sampler): :func:`locate` checks
every file before any output is touched, with the same one-line errors as the
WMT files (``file not found``, ``empty``, and later ``has N lines but ... has
M``, ``not valid UTF-8``), and :func:`materialize` splits a TSV into the two
files the stages read, in one streamed pass that names ``file:line`` for a line
without a tab, so a mistake in a TSV points at the TSV, never at a copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from distnmt.config import CorpusFiles
from distnmt.data.corpus import _open_binary, open_text
from distnmt.data.errors import DataError
from distnmt.data.sgml import read_sgml_parallel
from distnmt.data.stages import make_key, read_stamp, write_stamp
from distnmt.data.stream import LineBlockReader, decode_block

_SGML_START = re.compile(r"^\ufeff?\s*<(srcset|refset|tstset|doc)\b", re.IGNORECASE)
_TSV_BLOCK = 100_000  # lines split at a time: bounded memory whatever the file's size
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_SUFFIXES = (".gz", ".tsv", ".txt", ".sgm")


@dataclass
class OwnFiles:
    """One entry of the config with its files found: a pair, or a TSV to split."""

    key: str                          # "data.corpora[0]", "data.dev", "data.test"
    name: str
    src: Optional[Path] = None
    tgt: Optional[Path] = None
    tsv: Optional[Path] = None
    swap: bool = False                # the TSV's first column is the target language

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "src": str(self.src) if self.src else None,
                "tgt": str(self.tgt) if self.tgt else None, "tsv": str(self.tsv) if self.tsv else None,
                "swap_columns": self.swap}


@dataclass
class OwnSources:
    """Everything :func:`locate` found: training corpora, dev and test."""

    corpora: list[OwnFiles]
    dev: OwnFiles
    test: OwnFiles
    tsv_sha256: dict[str, str] = field(default_factory=dict)  # filled by materialize


def _stem(path: str) -> str:
    """'corpus/train.en.gz' -> 'train'; 'web-2023.tsv' -> 'web-2023'."""
    name = Path(path).name
    while True:
        for suffix in _SUFFIXES:
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        else:
            break
    # 'train.en' -> 'train': a trailing language code is not part of the name.
    base = name.rsplit(".", 1)[0] if "." in name else name
    return _NAME_CHARS.sub("_", base).strip("_") or "corpus"


def _default_name(files: CorpusFiles) -> str:
    return files.name or _stem(files.tsv or files.src or "corpus")


def own_split_name(files: CorpusFiles) -> str:
    """How records and reports name a user's dev or test set: its name, else its file's stem."""
    return _default_name(files)


def _resolve(base: Optional[Path], path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base is None else base / p


def check_file(path: Path, key: str) -> Path:
    """A readable file with at least one byte of text, or a one-line DataError naming it and the key."""
    if path.is_dir():
        raise DataError.at(path, None, f"is a directory, not a file ({key})")
    if not path.exists():
        raise DataError.at(path, None, f"file not found ({key})")
    with _open_binary(path) as f:
        try:
            first = f.read(1)
        except (EOFError, OSError) as exc:
            raise DataError.at(path, None, f"cannot read: {type(exc).__name__}: {exc}") from None
    if not first:
        raise DataError.at(path, None, f"empty: no lines to read ({key})")
    return path


def locate(
    corpora: Sequence[CorpusFiles], dev: Optional[CorpusFiles], test: Optional[CorpusFiles],
    langs: tuple[str, str], base: Optional[Path],
) -> OwnSources:
    """Check every file the config names (exists, not empty), relative to ``base`` (data.source_dir)."""
    if not corpora or dev is None or test is None:
        raise DataError("data.corpora: with your own files, give data.corpora (at least one), data.dev and data.test")

    def one(files: CorpusFiles, key: str, name: str) -> OwnFiles:
        if files.tsv is not None:
            swap = files.columns is not None and files.columns != list(langs)
            return OwnFiles(key, name, tsv=check_file(_resolve(base, files.tsv), f"{key}.tsv"), swap=swap)
        assert files.src is not None and files.tgt is not None
        return OwnFiles(key, name, src=check_file(_resolve(base, files.src), f"{key}.src"),
                        tgt=check_file(_resolve(base, files.tgt), f"{key}.tgt"))

    found: list[OwnFiles] = []
    taken: set[str] = {c.name for c in corpora if c.name}
    for i, files in enumerate(corpora):
        name = files.name
        if name is None:  # from the file name, made unique among the corpora
            stem, name, n = _default_name(files), _default_name(files), 2
            while name in taken:
                name, n = f"{stem}-{n}", n + 1
            taken.add(name)
        found.append(one(files, f"data.corpora[{i}]", name))
    return OwnSources(found, one(dev, "data.dev", own_split_name(dev)), one(test, "data.test", own_split_name(test)))


# ---------------------------------------------------------------------------- TSV


def split_tsv(tsv: Path, src_out: Path, tgt_out: Path, swap: bool = False) -> tuple[int, str]:
    """Write the TSV's two columns to ``src_out`` and ``tgt_out``; returns (lines, sha256 of the TSV).

    One line is one pair: a line without a tab, or with more than one, is a DataError
    naming ``tsv:line``, as is invalid UTF-8. Written under temporary names, renamed
    when complete.
    """
    tmp_src, tmp_tgt = src_out.with_name(src_out.name + ".tmp"), tgt_out.with_name(tgt_out.name + ".tmp")
    src_out.parent.mkdir(parents=True, exist_ok=True)
    lines = 0
    with LineBlockReader(tsv) as reader, open(tmp_src, "w", encoding="utf-8", newline="\n") as fs, \
            open(tmp_tgt, "w", encoding="utf-8", newline="\n") as ft:
        while True:
            block, count = reader.take(_TSV_BLOCK)
            if not count:
                break
            # A TSV saved on Windows ends its lines with CR LF: the CR belongs to neither column.
            rows = [r[:-1] if r.endswith("\r") else r for r in decode_block(block, tsv, lines + 1)]
            for i, row in enumerate(rows):
                tabs = row.count("\t")
                if tabs != 1:
                    what = "no tab" if tabs == 0 else f"{tabs + 1} columns"
                    raise DataError.at(tsv, lines + i + 1, f"{what}: expected two columns, source<TAB>target")
            pairs = [row.split("\t") for row in rows]
            a, b = (1, 0) if swap else (0, 1)
            fs.write("".join(p[a] + "\n" for p in pairs))
            ft.write("".join(p[b] + "\n" for p in pairs))
            lines += count
        sha256, _ = reader.finish()
    if lines == 0:
        raise DataError.at(tsv, None, "empty: no lines to read")
    tmp_src.replace(src_out)
    tmp_tgt.replace(tgt_out)
    return lines, sha256


def materialize(own: OwnSources, work: Path, langs: tuple[str, str]) -> None:
    """Split every TSV into ``work/own/<name>.<key>.{src,tgt}`` (reused while the TSV is unchanged),
    so that each entry has its ``src`` and ``tgt`` files for the stages."""
    out = work / "own"
    for files in [*own.corpora, own.dev, own.test]:
        if files.tsv is None:
            continue
        stat = files.tsv.stat()
        key = make_key("tsv", str(files.tsv.resolve()), stat.st_size, stat.st_mtime_ns, files.swap, langs)
        tag = files.key.replace("data.", "").replace("[", "").replace("]", "")
        src, tgt = out / f"{tag}.{langs[0]}", out / f"{tag}.{langs[1]}"
        stamp_path = out / f"{tag}.json"
        stamp = read_stamp(stamp_path, key)
        if stamp is None or not (src.is_file() and tgt.is_file()):
            _, sha256 = split_tsv(files.tsv, src, tgt, files.swap)
            write_stamp(stamp_path, key, sha256=sha256)
            stamp = {"sha256": sha256}
        files.src, files.tgt = src, tgt
        own.tsv_sha256[str(files.tsv)] = str(stamp["sha256"])


# ---------------------------------------------------------------------------- dev and test


def is_sgml(path: Path) -> bool:
    """True when the file opens with a WMT SGML tag (``<srcset``, ``<refset``, ``<tstset``, ``<doc``)."""
    with open_text(path) as f:
        head = f.read(4096)
    return bool(_SGML_START.match(head))


def _plain_lines(path: Path) -> list[str]:
    with open_text(path) as f:
        return [line[:-1] if line.endswith("\n") else line for line in f]


def read_eval_pair(src: Path, ref: Path) -> tuple[list[str], list[str]]:
    """Source and reference segments: SGML (detected) matched by ids, plain text by line (same count)."""
    sgml = (is_sgml(src), is_sgml(ref))
    if all(sgml):
        return read_sgml_parallel(src, ref)
    if any(sgml):
        plain = ref if sgml[0] else src
        raise DataError.at(plain, None, f"plain text, but {src if sgml[0] else ref} is SGML: give both in one form")
    src_lines, ref_lines = _plain_lines(src), _plain_lines(ref)
    if len(src_lines) != len(ref_lines):
        shorter, other = (src, ref) if len(src_lines) < len(ref_lines) else (ref, src)
        n, m = sorted((len(src_lines), len(ref_lines)))
        raise DataError.at(shorter, None, f"has {n} lines but {other} has {m}")
    return src_lines, ref_lines
