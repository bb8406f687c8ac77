"""``distnmt bench model --tiny``: runs in seconds and writes the figures the issue asks for."""

from __future__ import annotations

import json
from pathlib import Path

from distnmt.bench.model import main


def test_tiny_model_benchmark_writes_json_and_markdown(shared_data: Path, tmp_path: Path) -> None:
    # One thread: on a busy 2-core machine two OpenMP threads spin-wait for seconds a step.
    argv = ["--tiny", "--quiet", "--threads", "1", "--sample", str(shared_data), "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "model-tiny.json").read_text())
    assert result["tiny"] is True and result["benchmark"] == "model"

    training = result["training"]
    cases = {(r["threads"], r["precision"], r["gru"]) for r in training}
    assert cases == {(1, p, g) for p in ("fp32", "bf16") for g in ("cudnn", "paper")}
    for r in training:
        assert r["tokens_per_s"] > 0 and r["tokens_per_cpu_s"] > 0 and r["peak_rss_mib"] > 0
        assert r["target_tokens"] > 0 and 0 < r["padding_efficiency"] <= 1

    decoding = result["decoding"]
    assert [r["beam"] for r in decoding] == [1, 5, 12]
    for r in decoding:
        assert r["sentences_per_s"] > 0 and r["sentences"] == 3 and r["peak_rss_mib"] > 0
        assert r["mean_output_len"] > 0

    assert "bf16_over_fp32_cudnn_t1" in result["summary"]
    assert "paper_over_cudnn_fp32_t1" in result["summary"]
    markdown = (tmp_path / "model-tiny.md").read_text()
    assert "## Training" in markdown and "## Decoding" in markdown and "paper-bf16-t1" in markdown
