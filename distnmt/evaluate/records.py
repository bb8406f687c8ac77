"""The evaluator's persisted state: append-only JSONL files under ``<run_dir>/eval``.

``<split>.jsonl`` holds one line per scored checkpoint, ``<split>.skipped.jsonl``
one per checkpoint the "newest" policy skipped. Each line is written and
fsync'ed before the score is handed back to Ray, so an evaluator that dies and
is restarted reads back everything it ever reported; a line cut short by a
crash mid-write is ignored (that checkpoint is simply scored again).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

Record = dict[str, Any]

SPLITS = ("dev", "test")


class RecordStore:
    """Scored and skipped checkpoints of one run, in memory and on disk."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.scored: list[Record] = []
        self.skipped: list[Record] = []
        for split in SPLITS:
            self.scored += read_jsonl(self.scores_path(split))
            self.skipped += read_jsonl(self.skipped_path(split))

    def scores_path(self, split: str) -> Path:
        return self.out_dir / f"{split}.jsonl"

    def skipped_path(self, split: str) -> Path:
        return self.out_dir / f"{split}.skipped.jsonl"

    def add_score(self, record: Record) -> None:
        append_jsonl(self.scores_path(record["split"]), record)
        self.scored.append(record)

    def add_skip(self, record: Record) -> None:
        append_jsonl(self.skipped_path(record["split"]), record)
        self.skipped.append(record)


def read_jsonl(path: Path) -> list[Record]:
    """Every complete JSON line of ``path`` (none if it does not exist)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # cut short by a crash mid-write; that checkpoint is rescored
        if isinstance(record, dict):
            records.append(record)
    return records


def append_jsonl(path: Path, record: Record) -> None:
    """Append one line durably: a score once returned to Ray must survive an evaluator crash."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
