"""Reader for the WMT newstest SGML files (``<srcset>``/``<refset>`` with one ``<seg>`` per line).

The official files put every ``<seg id="..">text</seg>`` on its own line; we rely on
that layout (as sacreBLEU does) instead of a full SGML parser, and treat any other
line that opens a ``<seg`` as malformed so a broken file fails loudly instead of
silently losing segments and misaligning source and reference.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from distnmt.data.corpus import open_text
from distnmt.data.errors import DataError

_SEG = re.compile(r"^\s*<seg\b[^>]*>(.*)</seg>\s*$", re.IGNORECASE)
_SEG_OPEN = re.compile(r"<seg\b", re.IGNORECASE)


def read_sgml_segments(path: Path) -> list[str]:
    """Return the text of each ``<seg>`` in file order, stripped and with entities unescaped.

    Raises DataError naming ``file:line`` for a line that opens a ``<seg`` but is not
    one complete ``<seg ...>text</seg>`` element, and for a file with no segments.
    """
    path = Path(path)
    segments: list[str] = []
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not _SEG_OPEN.search(line):
                continue
            match = _SEG.match(line)
            if match is None or _SEG_OPEN.search(match.group(1)):
                raise DataError.at(path, lineno, "malformed <seg> line (expected one <seg ...>text</seg> per line)")
            text = html.unescape(match.group(1)).strip()
            if "\n" in text:
                # An escaped newline (&#10;) would split the segment when written one per line.
                raise DataError.at(path, lineno, "segment contains an escaped line break")
            segments.append(text)
    if not segments:
        raise DataError.at(path, None, "no <seg> elements found; is this a WMT SGML file?")
    return segments
