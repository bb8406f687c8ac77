"""distnmt.io: atomic writes leave the old file or the new one, never half of either."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from distnmt import io


def test_write_text_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"
    io.write_text(target, "one\n")
    io.write_text(target, "two\n")
    assert target.read_text(encoding="utf-8") == "two\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    io.write_json(target, {"ok": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_open(target) as handle:
            handle.write('{"half": ')
            raise RuntimeError("disk full")
    assert json.loads(target.read_text(encoding="utf-8")) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_bytes_append_and_checksums(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 5000  # over one read block
    io.write_bytes(tmp_path / "b.bin", blob)
    assert io.sha256_file(tmp_path / "b.bin") == hashlib.sha256(blob).hexdigest()
    assert io.sha256_text("é") == hashlib.sha256("é".encode("utf-8")).hexdigest()
    io.append_line(tmp_path / "log.jsonl", "a")
    io.append_line(tmp_path / "log.jsonl", "b\n")
    assert (tmp_path / "log.jsonl").read_text(encoding="utf-8") == "a\nb\n"
    with pytest.raises(ValueError):
        with io.atomic_open(tmp_path / "x", "a"):
            pass
