"""distnmt bench peer and eval-lag, the fast parts: JoeyNMT's config and token accounting,
its log parsing (real 2.3.0 log lines), the report files, and eval lag from records written
by the evaluator's own writer."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from distnmt.bench import eval_lag
from distnmt.bench.peer import (
    PeerData,
    joeynmt_batch_size,
    joeynmt_config,
    joeynmt_logging_freq,
    joeynmt_padding_efficiency,
    joeynmt_xent,
    markdown,
    minutes_to_targets,
    minutes_to_xent,
    parse_joeynmt_log,
    run_watched,
    ratios,
    tree_rss_mib,
)
from distnmt.config import ConfigError, load_config
from distnmt.evaluate.records import RecordStore, ScoreRecord, SkipRecord

REPO = Path(__file__).resolve().parents[1]

# Lines from a real JoeyNMT 2.3.0 train.log (run by `distnmt bench peer --tiny`).
JOEY_LOG = """\
2026-12-01 04:47:00,986 - INFO - joeynmt.model - Total params: 150512
2026-12-01 04:47:02,313 - INFO - joeynmt.training - EPOCH 1
2026-12-01 04:47:02,777 - INFO - joeynmt.training - Epoch   1, Step:        2, Batch Loss:     6.682824, Batch Acc: 0.002360, Tokens per Sec:    11896, Lr: 0.001000
2026-12-01 04:47:03,317 - INFO - joeynmt.training - Epoch   1, Step:        4, Batch Loss:     6.676547, Batch Acc: 0.004378, Tokens per Sec:    10169, Lr: 0.001000
2026-12-01 04:47:03,673 - INFO - joeynmt.prediction - Evaluation result (greedy): bleu:   0.15, loss:   6.67, ppl: 788.36, acc:   0.00, 0.2078[sec]
2026-12-01 05:02:36,058 - INFO - joeynmt.prediction - Predicting 500 example(s)... (Greedy decoding with min_output_length=1, max_output_length=150)
2026-12-01 05:03:43,007 - INFO - joeynmt.prediction - Evaluation result (greedy): bleu:   1.25, loss:   6.61, ppl: 743.39, acc:   0.00, 0.0031[sec]
2026-12-01 04:47:05,100 - INFO - joeynmt.training - EPOCH 2
"""


def _cfg(*overrides: str):
    return load_config(REPO / "configs/quickstart.yaml", list(overrides))


def _data(tmp: Path) -> PeerData:
    return PeerData(tmp / "train", tmp / "dev", tmp / "test", tmp / "v.en", tmp / "v.fr", tmp / "s.en", tmp / "s.fr", 9)


def test_joeynmt_config_has_our_sizes_data_and_budget(tmp_path: Path) -> None:
    cfg = _cfg("model.embed_size=100", "model.hidden_size=200", "train.workers=2", "train.accumulate=3",
               "data.max_tokens=1000")
    joey = joeynmt_config(cfg, _data(tmp_path), tmp_path / "model", validation_freq=80, beam=1)
    enc, dec = joey["model"]["encoder"], joey["model"]["decoder"]
    assert (enc["type"], enc["rnn_type"], enc["bidirectional"], enc["hidden_size"]) == ("recurrent", "gru", True, 200)
    assert (dec["type"], dec["rnn_type"], dec["attention"], dec["hidden_size"]) == ("recurrent", "gru", "bahdanau", 200)
    assert enc["embeddings"]["embedding_dim"] == dec["embeddings"]["embedding_dim"] == 100
    assert enc["dropout"] == dec["dropout"] == dec["hidden_dropout"] == 0.0
    train = joey["training"]
    # One JoeyNMT process takes a whole distnmt step's budget: max_tokens x accumulate x workers.
    assert cfg.step_token_budget() == 1000 * 3 * 2 == joeynmt_batch_size(cfg) == train["batch_size"]
    assert (train["batch_type"], train["optimizer"], train["learning_rate"]) == ("token", "adam", 0.001)
    assert train["logging_freq"] == 20 and train["validation_freq"] == 80  # quickstart's log_every
    # JoeyNMT refuses a logging_freq not below, or not dividing, validation_freq.
    assert [joeynmt_logging_freq(2, 5), joeynmt_logging_freq(20, 40), joeynmt_logging_freq(30, 40)] == [1, 20, 20]
    with pytest.raises(ConfigError, match="checkpoint-every 1"):
        joeynmt_logging_freq(20, 1)
    for side, lang, spm in (("src", "en", "s.en"), ("trg", "fr", "s.fr")):
        assert joey["data"][side]["lang"] == lang
        assert joey["data"][side]["tokenizer_type"] == "sentencepiece"
        assert joey["data"][side]["tokenizer_cfg"]["model_file"].endswith(spm)


def _joeynmt_token_batches(src: list[int], tgt: list[int], order: list[int], batch_size: int) -> list[list[int]]:
    """JoeyNMT 2.3.0's TokenBatchSampler.__iter__, transcribed (datasets.py), over a given order."""
    batches, batch, max_tokens = [], [], 0
    for idx in order:
        n_tokens = max(src[idx] + 1, tgt[idx] + 1)
        batch.append(idx)
        max_tokens = max(max_tokens, n_tokens)
        if max_tokens * len(batch) >= batch_size:
            batches.append(batch)
            batch, max_tokens = [], 0
    if batch:
        batches.append(batch)
    return batches


def test_joeynmt_padding_replay_matches_its_sampler() -> None:
    rng = np.random.default_rng(4)
    src, tgt = rng.integers(1, 50, 3000), rng.integers(1, 50, 3000)
    order = np.random.default_rng(7).permutation(3000).tolist()
    batches = _joeynmt_token_batches(src.tolist(), tgt.tolist(), order, 600)
    real = sum(int((tgt[b] + 1).sum()) for b in batches)
    padded = sum(len(b) * int((tgt[b] + 1).max()) for b in batches)
    assert joeynmt_padding_efficiency(src, tgt, 600, seed=7) == pytest.approx(real / padded)
    # Its batches reach the budget (ours stay within it): the accounting docs/BENCHMARKS.md states.
    assert all(len(b) * max(max(src[i], tgt[i]) + 1 for i in b) >= 600 for b in batches[:-1])


def test_parse_joeynmt_log_real_lines() -> None:
    log = parse_joeynmt_log(JOEY_LOG, validation_freq=4)
    assert log["params"] == 150512
    # Differences of timestamps (approx on raw epoch seconds would allow ~30 min of slack).
    assert log["start"] - time.mktime(time.strptime("2026-12-01 04:47:02", "%Y-%m-%d %H:%M:%S")) == pytest.approx(0.313)
    assert [(t["step"], t["tokens_per_s"]) for t in log["train"]] == [(2, 11896.0), (4, 10169.0)]
    assert [(e["step"], e["bleu"]) for e in log["evals"]] == [(4, 0.15), (8, 1.25)]
    # Dev cross-entropy per target subword: log of the logged ppl (exp of summed NLL / target tokens
    # incl. EOS), which agrees with the logged per-token loss to its two decimals.
    assert [e["xent"] for e in log["evals"]] == [pytest.approx(math.log(788.36)), pytest.approx(math.log(743.39))]
    assert [round(e["xent"], 2) for e in log["evals"]] == [6.67, 6.61]
    assert joeynmt_xent({"bleu": "0.1"}) is None  # a log without ppl (compute_loss off): no figure
    # The scored state is that of validation's start: its duration is taken off the line's time.
    assert log["evals"][0]["time"] - log["start"] == pytest.approx(1.360 - 0.2078)
    # With its "Predicting" line, validation began there (decoding took a minute; scoring 0.003 s).
    assert log["evals"][1]["time"] - log["start"] == pytest.approx(15 * 60 + 33.745)


def test_minutes_to_targets_and_ratios() -> None:
    curve = [{"minutes": 1.0, "bleu": 0.05, "xent": 7.0}, {"minutes": 2.0, "bleu": 0.3, "xent": 5.5},
             {"minutes": 3.0, "bleu": 0.2, "xent": None}, {"minutes": 4.0, "bleu": 0.2, "xent": 4.9}]
    assert minutes_to_targets(curve, [0.1, 0.3, 1]) == {"0.1": 2.0, "0.3": 2.0, "1": None}
    # Cross-entropy falls: the first point at or below each target.
    assert minutes_to_xent(curve, [7, 5, 4]) == {"7": 1.0, "5": 4.0, "4": None}
    results = [{"system": "distnmt", "tokens_per_s": 3000, "test": {"bleu": 2.0}, "last_dev_xent": 4.9},
               {"system": "joeynmt", "tokens_per_s": 1500, "test": {"bleu": 1.5}, "last_dev_xent": 5.2},
               {"system": "naive", "error": "failed"}]
    assert ratios(results) == {"tokens_per_s_vs_joeynmt": 2.0, "test_bleu_minus_joeynmt": 0.5,
                               "last_dev_xent_minus_joeynmt": -0.3}


def test_markdown_has_one_row_per_system_and_the_signature() -> None:
    test = {"bleu": 1.234, "bleu_signature": "nrefs:1|tok:13a"}
    row = {"system": "distnmt", "tokens_per_s": 2500, "updates": 40, "params": 1234567, "padding_efficiency": 0.97,
           "peak_rss_training_process_mib": 800, "peak_rss_tree_mib": 3000, "peak_pss_tree_mib": 1900,
           "peak_uss_tree_mib": 1500, "startup_s": 12.0,
           "best_dev": {"bleu": 0.5}, "minutes_to_dev_bleu": {"0.1": 1.5, "1": None}, "test": test,
           "last_dev_xent": 5.4321, "minutes_to_dev_xent": {"6": 0.5, "5": None},
           "dev_curve": [{"step": 80, "minutes": 1.5, "bleu": 0.5, "xent": 5.4321}]}
    header = {"command": "distnmt bench peer --tiny", "ratios": {"tokens_per_s_vs_joeynmt": 1.7}}
    page = markdown(header, [row, {"system": "joeynmt", "error": "skipped: no venv"}], [0.1, 1], [6, 5])
    assert ("| distnmt | 2500 | 40 | 1,234,567 | 0.970 | 800 | 3000 | 1900 | 1500 | 12.0 | 0.50 | 1.5 |  | 5.432 | 0.5 |  "
            "| 1.23 |") in page
    assert "| min to dev xent 6 | min to dev xent 5 |" in page
    assert "| joeynmt | skipped: no venv |" in page
    assert "tokens_per_s_vs_joeynmt 1.7" in page and "nrefs:1|tok:13a" in page
    assert "| distnmt | 80 | 1.50 | 0.50 | 5.432 |" in page


def test_tree_rss_counts_children() -> None:
    import os

    before, _ = tree_rss_mib(os.getpid())
    child = subprocess.Popen(["python3", "-c", "x = bytearray(200 * 2**20); import time; time.sleep(30)"])
    try:
        deadline = time.time() + 20
        while time.time() < deadline and tree_rss_mib(child.pid)[1] < 190:  # the child's 200 MiB, touched
            time.sleep(0.2)
        total, _ = tree_rss_mib(os.getpid())
        assert tree_rss_mib(child.pid)[1] > 190 and total - before > 150  # this process's tree counts the child
    finally:
        child.kill()
        child.wait()


def test_run_watched_interrupts_a_child_even_when_this_process_ignores_sigint(tmp_path: Path) -> None:
    """A shell's background job (`... &`) starts with SIGINT ignored, and a child inherits
    that: JoeyNMT would then lose the deadline's SIGINT and run on until SIGTERM, 90 s
    later. run_watched gives the child SIGINT's default back."""
    import signal
    import sys

    script = ("import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
              "    print('interrupted', flush=True)\n    raise SystemExit(3)\n")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        started = time.time()
        watch = run_watched([sys.executable, "-c", script], tmp_path / "child.log", limit_s=60,
                            deadline=lambda launched: launched + 1.5)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (tmp_path / "child.log").read_text().strip() == "interrupted"
    assert watch["returncode"] == 3 and watch["interrupted"] and time.time() - started < 15


def _record(step: int, reported: float, started: float, scored: float, origin: str = "training",
            lag: float | None = None) -> ScoreRecord:
    return ScoreRecord(checkpoint=f"checkpoint_{step:08d}", step=step, split="dev", test_set="newstest2013",
                       bleu=step / 100, chrf=1.0, bleu_line="", bleu_signature="", chrf_signature="", sentences=30,
                       origin=origin, reported_at=reported, started_at=started, scored_at=scored,
                       decode_seconds=scored - started, lag_seconds=lag)


def test_eval_lag_from_records_written_by_the_evaluator_store(tmp_path: Path) -> None:
    run = tmp_path / "run"
    store = RecordStore(run / "eval")  # the evaluator's own writer
    store.add_score(_record(20, 100.0, 101.0, 105.0, lag=5.0))
    store.add_score(_record(40, 110.0, 112.0, 130.0, lag=20.0))
    store.add_score(_record(40, 110.0, 112.0, 130.0, lag=20.0))  # a restarted evaluator re-reading: counted once
    store.add_score(_record(40, 110.0, 200.0, 210.0, origin="evaluate"))  # not a training score
    store.add_score(_record(50, 120.0, 121.0, 125.0))  # no stored lag (unknown report time): left out
    # Scored by `distnmt evaluate` before training reported it, then re-issued: the stored lag
    # (report to re-issue) counts, not scored_at - reported_at (negative); it has no queue of its own.
    store.add_score(dataclasses.replace(_record(60, 140.0, 90.0, 95.0, lag=3.0), reused_from="evaluate"))
    store.add_skip(SkipRecord(checkpoint="checkpoint_00000030", step=30, split="dev", newer="checkpoint_00000040",
                              reported_at=108.0))
    result = eval_lag.measure(run, tmp_path / "out")
    assert [(r["step"], r["lag_s"], r["wait_s"]) for r in result["checkpoints"]] == [
        (20, 5.0, 1.0), (40, 20.0, 2.0), (60, 3.0, None)]
    assert result["summary"] == {"checkpoints": 3, "mean_lag_s": 9.33, "median_lag_s": 5.0, "max_lag_s": 20.0,
                                 "skipped": 1}
    assert json.loads((tmp_path / "out/eval_lag.json").read_text())["summary"]["max_lag_s"] == 20.0
    assert "| checkpoint_00000040 | 40 | 0.40 | 20.0 | 2.0 | 18.0 |" in (tmp_path / "out/eval_lag.md").read_text()
    assert eval_lag.main(["--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2")]) == 2


def test_bench_all_runs_every_benchmark_into_one_out(tmp_path: Path) -> None:
    from distnmt.bench.all import plan
    from distnmt.cli import BENCHMARKS

    steps = plan(tmp_path, tiny=True, minutes=0.5, overrides=["train.workers=1"])
    assert [name for name, _ in steps] == [b for b in BENCHMARKS if b != "all"]
    for name, argv in steps:
        # claim prepares its own corpus: a subfolder of the one --out.
        assert argv[argv.index("--out") + 1] == str(tmp_path / "claim" if name == "claim" else tmp_path)
        assert ("--tiny" in argv) == (name != "eval-lag")
    peer = dict(steps)["peer"]
    assert peer[peer.index("--minutes") + 1] == "0.5" and "train.workers=1" in peer
    assert dict(steps)["eval-lag"][:2] == ["--run", str(tmp_path / "runs/distnmt")]


def test_naive_differs_from_distnmt_in_bucketing_only(tmp_path: Path) -> None:
    """The naive baseline is distnmt's own run with data.bucketing=false, nothing else."""
    from distnmt.bench.peer import distnmt_sets

    ours = distnmt_sets("distnmt", ["data.max_tokens=600"], 2.0, 40, tmp_path, 1)
    naive = distnmt_sets("naive", ["data.max_tokens=600"], 2.0, 40, tmp_path, 1)
    differ = set(ours) ^ set(naive)
    assert differ == {"data.bucketing=true", "data.bucketing=false", "train.name=distnmt", "train.name=naive"}
    cfg = load_config(None, naive)
    assert cfg.data.bucketing is False and cfg.data.max_tokens == 600 and cfg.train.max_minutes == 2.0
