"""``distnmt bench eval-lag --run RUN_DIR``: how far the evaluator trails training.

From a finished run's files only: the evaluator appends one
:class:`~distnmt.evaluate.records.ScoreRecord` line per scored checkpoint to
``<run>/eval/dev.jsonl`` (or ``test.jsonl`` when ``eval.split`` is test) with
``reported_at`` (the checkpoint's ``meta.json`` mtime: when training finished
writing it), ``started_at`` (decoding began) and ``lag_seconds``, which the
evaluator stores in every path that hands a score to training. Per checkpoint:

- lag = the stored ``lag_seconds``: how long after the report its BLEU reached
  training (for a fresh score ``scored_at - reported_at``; for an earlier
  ``distnmt evaluate`` score re-issued to training, until it was re-issued);
- wait = started_at - reported_at: time queued behind earlier checkpoints
  (blank for a re-issued score: it was decoded before the report);
- decode = the decoding time the evaluator measured itself.

Checkpoints the "newest" policy skipped (``<split>.skipped.jsonl``) are counted
apart: they were never scored, so they have no lag. Figures go to
``<out>/eval_lag.json`` and ``<out>/eval_lag.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from distnmt.evaluate.records import read_scores, read_skips


def lag_rows(run_dir: Path, split: Optional[str] = None) -> tuple[str, list[dict[str, Any]], int]:
    """(split, one row per checkpoint scored during training, skipped count) of ``run_dir``.

    ``split`` None: dev when the run scored dev, else test. Rows are in step order;
    a checkpoint scored twice (a restarted evaluator re-reading its file) counts once.
    """
    eval_dir = Path(run_dir) / "eval"
    if not eval_dir.is_dir():
        raise FileNotFoundError(f"{eval_dir}: no evaluator records here (is {run_dir} a distnmt run directory?)")
    if split is None:
        split = "dev" if (eval_dir / "dev.jsonl").exists() else "test"
    rows: dict[str, dict[str, Any]] = {}
    for record in read_scores(eval_dir / f"{split}.jsonl"):
        # Only checkpoints that training reported have a lag; `distnmt evaluate` and the
        # end-of-run test score are not part of it.
        if record.origin != "training" or record.lag_seconds is None or record.reported_at is None:
            continue
        fresh = record.reused_from is None and record.started_at is not None
        rows.setdefault(record.checkpoint, {
            "checkpoint": record.checkpoint, "step": record.step, "bleu": record.bleu,
            "reported_at": record.reported_at, "lag_s": record.lag_seconds,
            "wait_s": round(record.started_at - record.reported_at, 2) if fresh else None,
            "decode_s": record.decode_seconds if fresh else None, "sentences": record.sentences,
        })
    skipped = len(read_skips(eval_dir / f"{split}.skipped.jsonl"))
    return split, sorted(rows.values(), key=lambda r: r["step"]), skipped


def summarize(rows: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    """Mean, median and max lag over the scored checkpoints (None when there are none)."""
    lags = [r["lag_s"] for r in rows]
    if not lags:
        return {"checkpoints": 0, "mean_lag_s": None, "median_lag_s": None, "max_lag_s": None}
    return {"checkpoints": len(lags), "mean_lag_s": round(statistics.fmean(lags), 2),
            "median_lag_s": round(statistics.median(lags), 2), "max_lag_s": round(max(lags), 2)}


def markdown(header: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The figures as a markdown page: header, per-checkpoint table, summary line."""
    out = ["# distnmt bench eval-lag\n", *(f"- {k}: {v}" for k, v in header.items()), "",
           "| checkpoint | step | dev BLEU | lag s | queued s | decode s |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['checkpoint']} | {r['step']} | {r['bleu']:.2f} | {r['lag_s']:.1f} "
                   f"| {_num(r['wait_s'])} | {_num(r['decode_s'])} |")
    out += ["", f"Lag over {summary['checkpoints']} checkpoint(s): mean {_num(summary['mean_lag_s'])} s, "
                f"median {_num(summary['median_lag_s'])} s, max {_num(summary['max_lag_s'])} s; "
                f"skipped by the 'newest' policy: {summary['skipped']}."]
    return "\n".join(out) + "\n"


def _num(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.1f}"


def measure(run_dir: Path, out: Path, split: Optional[str] = None, command: str = "") -> dict[str, Any]:
    """Compute the figures of ``run_dir`` and write ``out/eval_lag.{json,md}``; returns the JSON."""
    split, rows, skipped = lag_rows(run_dir, split)
    summary = summarize(rows) | {"skipped": skipped}
    header = {"command": command or f"distnmt bench eval-lag --run {run_dir}", "run": str(run_dir), "split": split,
              "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    out.mkdir(parents=True, exist_ok=True)
    result = {"header": header, "summary": summary, "checkpoints": rows}
    (out / "eval_lag.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / "eval_lag.md").write_text(markdown(header, rows, summary), encoding="utf-8")
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="distnmt bench eval-lag", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory (train.storage_path/train.name)")
    parser.add_argument("--split", choices=["dev", "test"], help="which scores (default: the run's eval split)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where eval_lag.json/.md go")
    args = parser.parse_args(argv)
    try:
        result = measure(args.run, args.out, args.split, "distnmt bench eval-lag " + " ".join(argv))
    except FileNotFoundError as err:
        print(f"distnmt bench eval-lag: error: {err}")
        return 2
    print((args.out / "eval_lag.md").read_text(encoding="utf-8"), end="")
    return 0 if result["summary"]["checkpoints"] else 1
