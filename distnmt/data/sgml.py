"""Reader for the WMT newstest SGML files (``<srcset>``/``<refset>`` > ``<doc docid=..>`` > ``<seg id=..>``).

Segments are identified by ``(docid, seg id)``, not by their position: a source
and a reference are matched by those ids, so a reference whose documents come in
another order still lines up, and a segment missing on one side is an error that
names the file and the id instead of a silent shift of every later line.

The official files put every ``<seg id="..">text</seg>`` on its own line; we rely
on that layout (as sacreBLEU does) instead of a full SGML parser, and treat any
other line that opens a ``<seg`` as malformed so a broken file fails loudly.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

from distnmt.data.corpus import open_text
from distnmt.data.errors import DataError

_SEG = re.compile(r"^\s*<seg\b([^>]*)>(.*)</seg>\s*$", re.IGNORECASE)
_SEG_OPEN = re.compile(r"<seg\b", re.IGNORECASE)
_DOC_OPEN = re.compile(r"<doc\b([^>]*)>", re.IGNORECASE)
_DOC_CLOSE = re.compile(r"</doc\s*>", re.IGNORECASE)
_ATTR = re.compile(r"""([\w:-]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""")


@dataclass(frozen=True)
class Segment:
    """One ``<seg>``: its document and segment ids, its text and where it is."""

    docid: str
    segid: str
    text: str
    line: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.docid, self.segid)


def _attrs(text: str) -> dict[str, str]:
    return {m.group(1).lower(): next(g for g in m.groups()[1:] if g is not None) for m in _ATTR.finditer(text)}


def read_sgml(path: Path) -> list[Segment]:
    """Every ``<seg>`` of a WMT SGML file with its ids, in file order.

    Raises a one-line DataError naming ``file:line`` for: a malformed ``<seg>`` line,
    a ``<seg>`` outside any ``<doc>`` or without an ``id``, a ``<doc>`` without a
    ``docid``, a nested or unclosed ``<doc>``, a duplicate ``(docid, id)``, a
    segment holding an escaped line break, and a file with no segments.
    """
    path = Path(path)
    segments: list[Segment] = []
    seen: dict[tuple[str, str], int] = {}
    doc: str | None = None
    doc_line = 0
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            opened = _DOC_OPEN.search(line)
            if opened:
                if doc is not None:
                    raise DataError.at(path, lineno, f"<doc> opened inside doc {doc!r} (opened at line {doc_line})")
                docid = _attrs(opened.group(1)).get("docid")
                if not docid:
                    raise DataError.at(path, lineno, "<doc> without a docid attribute")
                doc, doc_line = docid, lineno
            if _SEG_OPEN.search(line):
                segments.append(_parse_seg(path, lineno, line, doc, seen))
            if _DOC_CLOSE.search(line):
                if doc is None:
                    raise DataError.at(path, lineno, "</doc> without an open <doc>")
                doc = None
    if doc is not None:
        raise DataError.at(path, doc_line, f"<doc docid={doc!r}> is never closed")
    if not segments:
        raise DataError.at(path, None, "no <seg> elements found; is this a WMT SGML file?")
    return segments


def _parse_seg(path: Path, lineno: int, line: str, doc: str | None, seen: dict[tuple[str, str], int]) -> Segment:
    match = _SEG.match(line)
    if match is None or _SEG_OPEN.search(match.group(2)):
        raise DataError.at(path, lineno, "malformed <seg> line (expected one <seg ...>text</seg> per line)")
    if doc is None:
        raise DataError.at(path, lineno, "<seg> outside any <doc>")
    segid = _attrs(match.group(1)).get("id")
    if not segid:
        raise DataError.at(path, lineno, f"<seg> without an id attribute in doc {doc!r}")
    key = (doc, segid)
    if key in seen:
        raise DataError.at(path, lineno, f"duplicate seg id {segid!r} in doc {doc!r} (first at line {seen[key]})")
    seen[key] = lineno
    text = html.unescape(match.group(2)).strip()
    if "\n" in text:
        # An escaped newline (&#10;) would split the segment when written one per line.
        raise DataError.at(path, lineno, "segment contains an escaped line break")
    return Segment(doc, segid, text, lineno)


def read_sgml_segments(path: Path) -> list[str]:
    """Return the text of each ``<seg>`` in file order, stripped and with entities unescaped."""
    return [seg.text for seg in read_sgml(path)]


def read_sgml_parallel(src_path: Path, ref_path: Path) -> tuple[list[str], list[str]]:
    """Source and reference texts matched by ``(docid, seg id)``, in the source's order.

    A segment present on one side only is a DataError naming the file that lacks
    it, the ids, and where the other side has it.
    """
    src_path, ref_path = Path(src_path), Path(ref_path)
    src, ref = read_sgml(src_path), read_sgml(ref_path)
    by_key = {seg.key: seg for seg in ref}
    for seg in src:
        if seg.key not in by_key:
            raise DataError.at(
                ref_path, None, f"no seg id {seg.segid!r} in doc {seg.docid!r} (the source has it at {src_path}:{seg.line})"
            )
    if len(ref) != len(src):
        src_keys = {seg.key for seg in src}
        extra = next(seg for seg in ref if seg.key not in src_keys)
        raise DataError.at(
            src_path, None,
            f"no seg id {extra.segid!r} in doc {extra.docid!r} (the reference has it at {ref_path}:{extra.line})",
        )
    return [seg.text for seg in src], [by_key[seg.key].text for seg in src]
