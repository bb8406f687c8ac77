"""The training benchmark runs end to end in its tiny mode (so it never rots)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distnmt.bench.train import main
from distnmt.config import ConfigError

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.beside]


def test_bench_train_tiny_writes_its_figures(prepared: Path, tmp_path: Path) -> None:
    assert main(["--tiny", "--set", f"data.prepared_dir={prepared}", "--out", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "train.json").read_text())
    (case,) = figures["results"]
    assert case["case"] == "ddp-w1-fp32" and case["tokens_per_s"] > 0
    assert 0 < case["padding_efficiency"] <= 1
    assert "| ddp-w1-fp32 |" in (tmp_path / "train.md").read_text()


def test_bench_train_refuses_a_gpu_config_on_a_cluster_without_one(prepared: Path, tmp_path: Path) -> None:
    """The benchmark starts Ray once for all its runs, so the driver's check that a GPU is
    there asks that cluster (it used to wait for a worker group that could never start)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=r"train.use_gpu: True but the Ray cluster this process runs on has no GPU"):
        main(["--tiny", "--set", f"data.prepared_dir={prepared}", "--set", "train.use_gpu=true", "--out", str(tmp_path)])
