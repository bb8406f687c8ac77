"""Cleaning rules for training pairs: each one switchable, each one counted.

Rules run in this order on every pair; a dropped pair is counted under the first
rule that drops it, so the counts of one part add up to the pairs read:

========== ========= ==============================================================
rule       effect    what it does
========== ========= ==============================================================
line_breaks modifies  CR, VT, FF, FS, GS, RS, NEL, U+2028, U+2029 become spaces: some
                      readers (``str.splitlines``, universal newlines, many editors)
                      take them for line breaks and would shift one side of the corpus
normalize  modifies  Unicode normalisation (NFC by default; NFKC also folds
                      compatibility characters such as ligatures and full-width forms)
empty      drops     a side that is empty after stripping surrounding whitespace
max_words  drops     more than ``max_words`` whitespace-separated words on a side
                      (the paper trains on sentences of up to 50 words)
ratio      drops     one side more than ``max_ratio`` times as many words as the other
duplicate  drops     an exact repeat of an earlier pair, after the rules above
                      (global, see :mod:`distnmt.data.prepare`)
too_long   drops     more than ``max_len`` subwords on a side (after sentencepiece)
========== ========= ==============================================================

Dev and test sets are never cleaned: BLEU is scored on the raw references.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

LINE_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_FOLD = str.maketrans({c: " " for c in LINE_BREAKS})
_HAS_BREAK = re.compile(f"[{re.escape(LINE_BREAKS)}]")

MODIFYING_RULES = ("line_breaks", "normalize")
DROPPING_RULES = ("empty", "max_words", "ratio", "duplicate", "too_long")


@dataclass(frozen=True)
class CleanRules:
    """Which rules run (see the module docstring); the defaults only fix what is broken."""

    normalize: Optional[str] = "NFC"  # "NFC", "NFKC" or None
    fold_line_breaks: bool = True
    drop_empty: bool = True
    max_words: Optional[int] = None
    max_ratio: Optional[float] = None
    dedupe: bool = False

    def __post_init__(self) -> None:
        if self.normalize not in (None, "NFC", "NFKC"):
            raise ValueError(f"normalize must be 'NFC', 'NFKC' or None, got {self.normalize!r}")
        if self.max_words is not None and self.max_words < 1:
            raise ValueError(f"max_words must be positive or None, got {self.max_words}")
        if self.max_ratio is not None and self.max_ratio < 1:
            raise ValueError(f"max_ratio must be at least 1 or None, got {self.max_ratio}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fold(lines: list[str]) -> tuple[list[str], set[int]]:
    """Line-break characters to spaces; returns the lines and the indices that changed."""
    changed: set[int] = set()
    # One regex scan of the joined block is far cheaper than one per line, and
    # almost every block of a real corpus has no such character at all.
    if not _HAS_BREAK.search("\n".join(lines)):
        return lines, changed
    out = list(lines)
    for i, line in enumerate(lines):
        if _HAS_BREAK.search(line):
            out[i] = line.translate(_FOLD)
            changed.add(i)
    return out, changed


def _normalize(lines: list[str], form: str) -> tuple[list[str], set[int]]:
    """Unicode normalisation; returns the lines and the indices that changed."""
    changed: set[int] = set()
    if unicodedata.is_normalized(form, "\n".join(lines)):  # the usual case, checked in C
        return lines, changed
    out = list(lines)
    for i, line in enumerate(lines):
        if not unicodedata.is_normalized(form, line):
            out[i] = unicodedata.normalize(form, line)
            changed.add(i)
    return out, changed


def clean_block(src: list[str], tgt: list[str], rules: CleanRules) -> tuple[list[str], list[str], dict[str, int]]:
    """Apply every rule but ``duplicate`` and ``too_long`` to aligned lines.

    Returns the kept source and target lines and the counts: ``read``, ``kept``,
    one entry per modifying rule (pairs changed) and per dropping rule (pairs dropped).
    """
    if len(src) != len(tgt):
        raise ValueError(f"blocks differ in length: {len(src)} vs {len(tgt)}")
    counts = {"read": len(src), "kept": 0, **{r: 0 for r in MODIFYING_RULES}, **{r: 0 for r in DROPPING_RULES}}
    if rules.fold_line_breaks:
        src, src_changed = _fold(src)
        tgt, tgt_changed = _fold(tgt)
        counts["line_breaks"] = len(src_changed | tgt_changed)
    if rules.normalize:
        src, src_changed = _normalize(src, rules.normalize)
        tgt, tgt_changed = _normalize(tgt, rules.normalize)
        counts["normalize"] = len(src_changed | tgt_changed)
    need_words = rules.max_words is not None or rules.max_ratio is not None
    keep_src: list[str] = []
    keep_tgt: list[str] = []
    for s, t in zip(src, tgt):
        s, t = s.strip(), t.strip()
        if rules.drop_empty and (not s or not t):
            counts["empty"] += 1
            continue
        if need_words:
            ns, nt = len(s.split()), len(t.split())
            if rules.max_words is not None and max(ns, nt) > rules.max_words:
                counts["max_words"] += 1
                continue
            if rules.max_ratio is not None and max(ns, nt) > rules.max_ratio * max(min(ns, nt), 1):
                counts["ratio"] += 1
                continue
        keep_src.append(s)
        keep_tgt.append(t)
    counts["kept"] = len(keep_src)
    return keep_src, keep_tgt, counts


def pair_hashes(src: list[str], tgt: list[str]) -> np.ndarray:
    """A 64-bit content hash per pair, for exact-duplicate removal.

    blake2b rather than ``hash()``: Python's string hash is salted per process, and
    the workers that compute these are different processes. At 40M pairs the
    chance of any false collision is about 4e-5.
    """
    out = np.empty(len(src), dtype=np.uint64)
    for i, (s, t) in enumerate(zip(src, tgt)):
        digest = hashlib.blake2b(f"{s}\t{t}".encode("utf-8"), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little")
    return out
