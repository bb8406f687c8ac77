"""The synthetic task of distnmt bench claim: a known translation, reproducible, and
prepared through ``distnmt prepare --synthetic`` like any corpus (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distnmt.cli import main
from distnmt.data.prepared import PreparedData
from distnmt.data.synthetic import SyntheticTask, translate, write_corpus

REPO = Path(__file__).resolve().parents[1]


def test_the_synthetic_task_is_a_known_function_and_reproducible(tmp_path: Path) -> None:
    task = SyntheticTask(train_pairs=50, dev_pairs=5, test_pairs=5, max_words=8, group=3)
    write_corpus(task, tmp_path / "a")
    write_corpus(task, tmp_path / "b")
    for rel in ("train/train.src", "train/train.tgt", "dev/dev.tgt", "test/test.src"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    meta = json.loads((tmp_path / "a" / "synthetic.json").read_text())
    dictionary = meta["dictionary"]
    sources = (tmp_path / "a/train/train.src").read_text().splitlines()
    targets = (tmp_path / "a/train/train.tgt").read_text().splitlines()
    for src, tgt in zip(sources, targets):
        assert tgt.split() == translate(src.split(), dictionary, 3)
        assert 3 <= len(src.split()) <= 8
    assert translate(["a", "b", "c", "d"], {c: c.upper() for c in "abcd"}, 3) == ["C", "B", "A", "D"]
    assert translate(["a", "b", "c"], {c: c.upper() for c in "abc"}, 0) == ["C", "B", "A"]
    with pytest.raises(ValueError, match="min_words"):
        SyntheticTask(min_words=5, max_words=3)


def test_prepare_synthetic_writes_and_prepares_the_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sets = ["--set", f"data.source_dir={tmp_path / 'corpus'}", "--set", f"data.prepared_dir={tmp_path / 'prepared'}",
            "--set", "data.workers=1"]
    code = main(["prepare", "--config", str(REPO / "configs/claim.yaml"), "--quiet", *sets,
                 "--synthetic", "train_pairs=400", "dev_pairs=20", "test_pairs=30", "max_words=60"])
    assert code == 0, capsys.readouterr().err
    prepared = PreparedData.load(tmp_path / "prepared")
    assert len(prepared.eval_text("dev")[0]) == 20
    assert len(prepared.eval_text("test")[1]) == 30
    assert prepared.manifest["counts"]["train"] == 400  # nothing filtered: every length is kept
    lengths = [len(line.split()) for line in (tmp_path / "corpus/test/test.src").read_text().splitlines()]
    assert max(lengths) > 40 and min(lengths) < 10  # long and short sentences, for Figure 2's bins
    # A config that would not read what --synthetic writes is refused in one line.
    code = main(["prepare", "--config", str(REPO / "configs/claim.yaml"), "--quiet", *sets,
                 "--set", "data.dev_prefix=dev/other", "--synthetic"])
    assert code == 2
    assert "data.dev_prefix: 'dev/other' but --synthetic writes 'dev/dev'" in capsys.readouterr().err
    assert main(["prepare", "--config", str(REPO / "configs/claim.yaml"), *sets, "--synthetic", "words=x"]) == 2
    assert "--synthetic 'words=x': expected KEY=INTEGER" in capsys.readouterr().err
