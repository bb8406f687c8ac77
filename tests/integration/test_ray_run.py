"""End to end with real parts: prepare real WMT'14 sample data, train with 2 Ray
Train workers (gloo DDP) while the evaluator actor scores checkpoints with
sacreBLEU, then translate with the CLI from the last checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distnmt.checkpoint import load_checkpoint

pytestmark = pytest.mark.integration


def test_two_workers_train_while_the_evaluator_scores(tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distnmt.orchestrate import run_training

    # Ray Train's controller polls every 2 s by default, which is long next to
    # this tiny run; the local cluster inherits this from the test's process.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    cfg = tiny_config(tmp_path, "it", "train.max_steps=150", "train.checkpoint_every=50")
    records = run_training(cfg)

    run_dir = tmp_path / "it"
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert [p.name for p in checkpoints] == ["checkpoint_00000050", "checkpoint_00000100", "checkpoint_00000150"]
    # Every checkpoint was scored by the evaluator, and the scores are persisted.
    assert sorted(r.step for r in records) == [50, 100, 150]
    persisted = [json.loads(line) for line in (run_dir / "eval" / "dev.jsonl").read_text().splitlines()]
    assert sorted(r["checkpoint"] for r in persisted) == [p.name for p in checkpoints]
    for record in persisted:
        assert record["sentences"] == 30
        assert 0.0 <= record["bleu"] <= 100.0
        assert record["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
        hyp = (run_dir / "eval" / f"dev.{record['checkpoint']}.hyp").read_text().splitlines()
        assert len(hyp) == 30
    # Concurrency: the first checkpoint was scored before training wrote its last one.
    first = min(persisted, key=lambda r: r["step"])
    assert first["scored_at"] < (checkpoints[-1] / "meta.json").stat().st_mtime

    # The checkpoint is complete: loads with checksums, holds the resume state.
    last = load_checkpoint(checkpoints[-1])
    assert last.step == 150
    assert {"model", "optimizer", "scheduler", "scaler", "sampler", "step", "epoch"} <= set(last.state)
    # Every rank's RNG state, merged by Ray from the workers' checkpoint directories.
    assert sorted(p.name for p in (checkpoints[-1] / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]

    # `distnmt translate` from that checkpoint alone: one output line per input line.
    lines = ["The house is small.", "", "Thank you very much for your attention."]
    out = subprocess.run(
        [sys.executable, "-m", "distnmt.cli", "translate", str(checkpoints[-1]), "--beam", "3", "--quiet"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == len(lines)
