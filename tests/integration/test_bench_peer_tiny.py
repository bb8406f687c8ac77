"""``distnmt bench peer --tiny`` runs for real (so it never rots): distnmt
always, JoeyNMT when its venv exists; and ``bench eval-lag`` reads the distnmt
run it left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distnmt.bench import eval_lag
from distnmt.bench.peer import DEFAULT_VENV, ensure_joeynmt, main

pytestmark = pytest.mark.integration

FIGURES = ("tokens_per_s", "updates", "params", "padding_efficiency", "peak_rss_training_process_mib",
           "peak_rss_tree_mib", "startup_s", "dev_curve", "minutes_to_dev_bleu", "best_dev", "test")


def _check(result: dict, system: str) -> None:
    assert "error" not in result, result.get("error")
    assert result["system"] == system
    for key in FIGURES:
        assert result[key] is not None, key
    assert result["tokens_per_s"] > 0 and result["updates"] > 0 and result["params"] > 0
    assert 0 < result["padding_efficiency"] <= 1 and result["peak_rss_tree_mib"] > 0
    assert set(result["minutes_to_dev_bleu"]) == {"0.1", "0.2", "0.5", "1"}
    # Dev cross-entropy per target subword at every dev point (distnmt: its records; JoeyNMT: its logged ppl).
    assert set(result["minutes_to_dev_xent"]) == {"6", "5", "4.5", "4"}
    assert all(p["xent"] is not None and p["xent"] > 0 for p in result["dev_curve"])
    assert result["test"]["sentences"] == 20 and "tok:13a" in result["test"]["bleu_signature"]


def test_bench_peer_tiny_distnmt(prepared: Path, tmp_path: Path) -> None:
    """distnmt only: the naive baseline is the same run with data.bucketing=false
    (tests/test_bench_peer.py checks that override; the sampler's unbucketed batches
    are property-tested in tests/test_data_sampler.py), and each run costs ~35 s here.
    The run is Ray Train's local mode (train.workers=0): the benchmark's plumbing (the
    run, its records, the curve, the test decode, eval-lag) is what this checks; a
    cluster's start-up would add ~20 s (the clustered path: test_job_submit.py's local run)."""
    assert main(["--tiny", "--systems", "distnmt", "--set", f"data.prepared_dir={prepared}",
                 "--set", "train.workers=0", "--out", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "peer.json").read_text())
    (distnmt,) = figures["results"]
    _check(distnmt, "distnmt")
    assert distnmt["bucketing"] is True
    assert distnmt["dev_curve"] and distnmt["updates"] >= distnmt["last_checkpoint_step"]
    page = (tmp_path / "peer.md").read_text()
    assert "| distnmt |" in page
    # The distnmt run is a real run directory: eval-lag reads its evaluator records.
    lag = eval_lag.measure(tmp_path / "runs/distnmt", tmp_path / "lag")
    assert lag["summary"]["checkpoints"] == len(distnmt["dev_curve"]) >= 1
    assert all(r["lag_s"] > 0 for r in lag["checkpoints"])


def test_bench_peer_tiny_joeynmt(prepared: Path, tmp_path: Path) -> None:
    if ensure_joeynmt(DEFAULT_VENV, install=False) is None:
        pytest.skip(f"no JoeyNMT venv at {DEFAULT_VENV}: `distnmt bench peer` (without --tiny) makes it")
    # 12 s of training, not --tiny's 3: the budget is wall clock from JoeyNMT's start, and
    # beside the unit tests (launch/test.sh's two streams) 3 s once passed before its first
    # logged step ("no training step logged in the budget").
    assert main(["--tiny", "--minutes", "0.2", "--systems", "joeynmt", "--set", f"data.prepared_dir={prepared}",
                 "--out", str(tmp_path)]) == 0
    (joey,) = json.loads((tmp_path / "peer.json").read_text())["results"]
    _check(joey, "joeynmt")
    assert joey["version"] == "2.3.0" and joey["bucketing"] is False
