"""The training benchmark runs end to end in its tiny mode (so it never rots)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distnmt.bench.train import main

pytestmark = pytest.mark.integration


def test_bench_train_tiny_writes_its_figures(prepared: Path, tmp_path: Path) -> None:
    assert main(["--tiny", "--set", f"data.prepared_dir={prepared}", "--out", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "train.json").read_text())
    (case,) = figures["results"]
    assert case["case"] == "ddp-w1-fp32" and case["tokens_per_s"] > 0
    assert 0 < case["padding_efficiency"] <= 1
    assert "| ddp-w1-fp32 |" in (tmp_path / "train.md").read_text()
