"""The checkpoint format: atomic write, checksums, safe loading, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distnmt.checkpoint import CheckpointError, check_vocab, load_checkpoint, read_meta, save_checkpoint


def _save(tmp_path: Path, name: str = "ckpt") -> Path:
    extra = tmp_path / "spm.model"
    extra.write_bytes(b"not really a model but bytes to checksum")
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 7}
    return save_checkpoint(tmp_path / name, state, step=7, config={"a": 1}, vocab_sha256={"en": "x", "fr": "y"},
                           extra_files={"spm.src.model": extra})


def test_round_trip(tmp_path: Path) -> None:
    path = _save(tmp_path)
    ckpt = load_checkpoint(path)
    assert ckpt.step == 7
    assert torch.equal(ckpt.state["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert ckpt.meta["config"] == {"a": 1}
    assert set(ckpt.meta["files"]) == {"state.pt", "spm.src.model"}
    # Nothing but the checkpoint itself is left beside it (the temp dir was renamed).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "spm.model"]


@pytest.mark.parametrize("victim", ["state.pt", "spm.src.model"])
def test_corruption_is_detected(tmp_path: Path, victim: str) -> None:
    path = _save(tmp_path)
    data = (path / victim).read_bytes()
    (path / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{victim}: checksum mismatch"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "random").mkdir()
    with pytest.raises(CheckpointError, match="not a distnmt checkpoint"):
        load_checkpoint(tmp_path / "random")
    (tmp_path / "random" / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a distnmt checkpoint"):
        read_meta(tmp_path / "random")


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    path = _save(tmp_path)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        _save(tmp_path)
    assert load_checkpoint(path).step == 7


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    """weights_only loading: a checkpoint cannot execute code on load."""
    path = _save(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"model": Evil()}, path / "state.pt")
    meta = read_meta(path)
    from distnmt.checkpoint import sha256_file

    meta["files"]["state.pt"] = sha256_file(path / "state.pt")
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_checkpoint(path)


def test_vocab_mismatch(tmp_path: Path) -> None:
    path = _save(tmp_path)
    check_vocab(read_meta(path), {"en": "x", "fr": "y"}, path)
    with pytest.raises(CheckpointError, match="different vocabulary"):
        check_vocab(read_meta(path), {"en": "x", "fr": "z"}, path)
