"""The end of a run: the best checkpoint by dev BLEU, its test score and the paper's figures.

Called once training has ended (by the evaluator actor's ``finalize()``, which
holds the resources to decode); a pure composition of the run's records, one
test decode (through the ``score_test`` callback, so that it is persisted and
logged like every other score) and the figures. Its outcome is a
:class:`~distnmt.evaluate.records.FinalReport` (``eval/final.json``).
"""

from __future__ import annotations

import contextlib
import posixpath
from pathlib import Path
from typing import Callable, Iterator, Optional

from distnmt.checkpoint import META_FILE
from distnmt.config import EvalConfig
from distnmt.evaluate.policy import best_record
from distnmt.evaluate.records import FinalReport, ScoreRecord
from distnmt.evaluate.score import EvalSplit


def finish_run(records: list[ScoreRecord], eval_cfg: EvalConfig, run_dir: Path, eval_dir: Path,
               stop_reason: Optional[str], skipped: list[str],
               score_test: Callable[[Path, ScoreRecord], ScoreRecord],
               load_split: Callable[[str], EvalSplit], device: str = "cpu") -> FinalReport:
    """The run's outcome from its training scores ``records`` (on ``eval_cfg.split``).

    The best is scored on the test set by ``score_test(checkpoint_dir, best)`` when
    ``eval.test_at_end`` and drawn when ``eval.figures``; if the best checkpoint is
    gone (``train.keep_checkpoints``), both are skipped with a line saying so.
    """
    best = best_record(records)
    final = FinalReport(best=best, stop_reason=stop_reason, skipped=skipped, lag_seconds=lag_summary(records))
    if best is None:
        print("[evaluator] no checkpoint was scored: nothing to finalize", flush=True)
        return final
    with checkpoint_dir(best, run_dir) as directory:
        if directory is None:
            print(f"[evaluator] best checkpoint {best.checkpoint} is gone from {best.path} "
                  "(deleted by train.keep_checkpoints?): no test score, no figures", flush=True)
            return final
        if eval_cfg.test_at_end and eval_cfg.split != "test":
            final.test = test = score_test(directory, best)
            print(f"[evaluator] best by {best.test_set} BLEU: {best.checkpoint} (step {best.step}, "
                  f"{best.bleu:.2f}); {test.test_set}: {test.bleu_line}", flush=True)
        if eval_cfg.figures:
            # Late: matplotlib takes a second to import, needed once per run, and a
            # restarted actor should be back to scoring as soon as it can.
            from distnmt.evaluate.figures import draw_run_figures

            scored = final.test or best
            hypotheses = (eval_dir / scored.hyp_file).read_text(encoding="utf-8").splitlines()
            paths = draw_run_figures(run_dir / "figures", best, scored, load_split(scored.split), hypotheses,
                                     load_split(eval_cfg.split), directory, eval_cfg, device)
            final.figures = [str(p.relative_to(run_dir)) for p in paths]
            print(f"[evaluator] figures: {', '.join(final.figures)}", flush=True)
    return final


@contextlib.contextmanager
def checkpoint_dir(record: ScoreRecord, run_dir: Path) -> Iterator[Optional[Path]]:
    """A local directory holding the record's checkpoint (fetched from cloud storage if need be), or None."""
    path = str(record.path or run_dir / record.checkpoint)
    if Path(path).is_dir():
        yield Path(path)
        return
    import ray.train  # late: only for a checkpoint in cloud storage

    try:
        checkpoint = ray.train.Checkpoint(path)
        exists = checkpoint.filesystem.get_file_info(posixpath.join(checkpoint.path, META_FILE)).is_file
    except (OSError, ValueError):
        exists = False
    if not exists:
        yield None
        return
    with checkpoint.as_directory() as directory:
        yield Path(directory)


def lag_summary(records: list[ScoreRecord]) -> Optional[dict[str, float]]:
    """Mean and max of the stored lags (None when no score has one)."""
    lags = [r.lag_seconds for r in records if r.lag_seconds is not None]
    if not lags:
        return None
    return {"mean": round(sum(lags) / len(lags), 2), "max": round(max(lags), 2), "checkpoints": len(lags)}
