"""`distnmt bench data --tiny`: the data benchmark runs end to end and writes its figures."""

from __future__ import annotations

import json
from pathlib import Path

from distnmt.cli import main


def test_bench_data_tiny_writes_figures(shared_data: Path, tmp_path: Path) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    assert main(["bench", "data", "--tiny", "--sample", str(shared_data), "--out", str(out), "--work", str(work),
                 "--workers", "2"]) == 0
    figures = json.loads((out / "data-tiny.json").read_text())
    prepare, loader = figures["prepare"], figures["loader"]
    assert prepare["pairs_read"] == 3999 and prepare["pairs_per_s"] > 0 and prepare["workers"] == 2
    assert 0 < prepare["peak_rss_largest_process_mib"] < 2048
    assert loader["target_tokens_per_s"] > 0 and figures["train_step"]["target_tokens_per_s"] > 0
    padding = figures["padding"]["corpus"]
    assert padding["random"] < padding["pools of 20 batches (paper)"] <= padding["whole-epoch bucketing (pool_batches 0)"]
    assert prepare["pairs_per_cpu_s"] > 0 and figures["loader"]["target_tokens_per_cpu_s"] > 0
    assert set(figures["targets"]) == {"rss", "padding", "loader"}
    table = (out / "data-tiny.md").read_text()
    assert "| loader / training step (per CPU-s) |" in table and "distnmt bench data --tiny" in table
    assert not work.exists()  # removed unless --keep
