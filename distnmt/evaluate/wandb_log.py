"""The evaluator's own W&B run: scores, sample translations, the paper's figures.

Rank 0 of training owns the training run (loss, tokens/s), and W&B does not let
two live processes write one run. So the evaluator logs to a second run in the
same group (``group = train.name``, ``job_type = "eval"``); the W&B UI shows the
two side by side, and both use the training step as their x axis. The run id is
kept in ``<run_dir>/eval/wandb_run_id``, so an evaluator that Ray restarts (or a
resumed training run) goes on logging into the same run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

from distnmt.config import Config
from distnmt.evaluate.records import ScoreRecord

ID_FILE = "wandb_run_id"


def wandb_mode(requested: str) -> str:
    """'online' only with a key at hand (never a login prompt inside an actor); else offline."""
    if requested == "online" and not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists()):
        return "offline"
    return requested


class EvalLogger:
    """A lazily started W&B run; every method is a no-op when ``logging.wandb`` is disabled."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.enabled = cfg.logging.wandb != "disabled"
        self._run: Optional[Any] = None
        self._sample_rows: list[list[Any]] = []

    def _start(self) -> Any:
        if self._run is None:
            import wandb  # late: slow to import, unused when disabled

            id_path = self.run_dir / "eval" / ID_FILE
            run_id = id_path.read_text().strip() if id_path.exists() else _new_id(self.cfg.train.name)
            id_path.parent.mkdir(parents=True, exist_ok=True)
            id_path.write_text(run_id + "\n")
            mode = wandb_mode(self.cfg.logging.wandb)
            self._run = wandb.init(
                project=self.cfg.logging.wandb_project, name=f"{self.cfg.train.name}-eval",
                group=self.cfg.train.name, job_type="eval", config=self.cfg.to_dict(),
                mode=mode, dir=str(self.run_dir), id=run_id, resume="allow",
                settings=wandb.Settings(console="off", silent=True),
            )
            # The training step is the x axis of every eval metric, not W&B's own
            # call counter (which restarts at 0 when a restarted evaluator resumes).
            self._run.define_metric("train_step")
            self._run.define_metric("dev/*", step_metric="train_step")
            self._run.define_metric("test/*", step_metric="train_step")
            if mode == "offline":
                print(f"[evaluator] W&B offline: files in {self._run.dir}; `wandb sync` uploads them", flush=True)
        return self._run

    @property
    def run_id(self) -> Optional[str]:
        return self._run.id if self._run is not None else None

    def log_scores(self, record: ScoreRecord, sources: list[str], references: list[str], hypotheses: list[str]) -> None:
        """One checkpoint's scores, and its first ``eval.samples`` translations appended to the samples table."""
        if not self.enabled:
            return
        import wandb

        run = self._start()
        split = record.split
        payload: dict[str, Any] = {
            "train_step": record.step,
            f"{split}/bleu": record.bleu,
            f"{split}/chrf": record.chrf,
            f"{split}/decode_seconds": record.decode_seconds,
        }
        if record.xent is not None:  # cross-entropy per target subword: moves before BLEU does
            payload[f"{split}/xent"] = record.xent
        if record.lag_seconds is not None:
            payload[f"{split}/lag_seconds"] = record.lag_seconds
        count = min(self.cfg.eval.samples, len(hypotheses))
        if count:
            self._sample_rows += [
                [record.step, record.checkpoint, split, sources[i], references[i], hypotheses[i]]
                for i in range(count)
            ]
            # W&B tables are immutable once logged: log the growing table each time.
            payload["samples"] = wandb.Table(
                columns=["step", "checkpoint", "split", "source", "reference", "hypothesis"], data=self._sample_rows
            )
        run.log(payload)

    def log_final(self, best: ScoreRecord, test: Optional[ScoreRecord], figures: list[Path]) -> None:
        """The best checkpoint, its test score and the figures, in the run's summary and media."""
        if not self.enabled:
            return
        import wandb

        run = self._start()
        run.summary["best/checkpoint"] = best.checkpoint
        run.summary["best/step"] = best.step
        run.summary["best/dev_bleu"] = best.bleu
        if best.xent is not None:
            run.summary["best/dev_xent"] = best.xent
        payload: dict[str, Any] = {"train_step": best.step}
        if test is not None:
            run.summary["best/test_bleu"] = test.bleu
            run.summary["best/test_chrf"] = test.chrf
            payload.update({"test/bleu": test.bleu, "test/chrf": test.chrf})
            if test.xent is not None:
                payload["test/xent"] = test.xent
        for path in figures:
            payload[f"figures/{path.stem}"] = wandb.Image(str(path))
        run.log(payload)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def _new_id(name: str) -> str:
    """A fresh W&B run id that says what it is: '<train name>-eval-<random>'."""
    import secrets

    safe = re.sub(r"[^A-Za-z0-9_-]", "-", name)[:40]
    return f"{safe}-eval-{secrets.token_hex(4)}"
