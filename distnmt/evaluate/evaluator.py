"""The evaluator actor: decides when each reported checkpoint is scored while training goes on.

:class:`Evaluator` is a plain class (testable without Ray); the driver runs it
as a named, threaded Ray actor with its own resources (``eval.num_cpus``,
``eval.num_gpus``), restarted by Ray if it dies. Ray Train's checkpoint-validation
hook (:func:`distnmt.evaluate.hook.score_with_evaluator`, run as a Ray task after each
``ray.train.report(..., validation=True)``) hands every new checkpoint to the
actor and returns its scores, which Ray merges into that checkpoint's metrics
(it lives in :mod:`distnmt.evaluate.hook`, light to import).
Training never waits: the hook runs beside the workers, and Ray waits for the
pending ones when training ends.

The scoring itself (decode, sacreBLEU, cross-entropy) is :mod:`distnmt.evaluate.score`,
which ``distnmt evaluate`` calls without the actor; the records are
:mod:`distnmt.evaluate.records`. What the actor adds, and where it is decided:

- falling behind: Ray runs one validation at a time and queues the rest, so
  the actor decides when a checkpoint's turn comes (``eval.policy``, see
  :mod:`distnmt.evaluate.policy`); it learns of newer checkpoints from the
  checkpoints handed to it and from the run's storage directory;
- early stopping: :meth:`Evaluator.stop_reason`, asked by training rank 0
  after each report, says why to stop once ``eval.patience`` scored
  checkpoints have not beaten the best dev BLEU;
- the end of the run, :meth:`Evaluator.finalize`: it catches up on checkpoints
  never handed over, then runs :func:`distnmt.evaluate.final.finish_run` (the best
  checkpoint by dev BLEU scored on newstest2014, the paper's figures) and writes
  ``eval/final.json`` and W&B;
- restarts: every score is persisted at once (:mod:`distnmt.evaluate.records`),
  a restarted actor reads them back, and Ray retries the call that was in
  flight (``max_task_retries``), so no reported checkpoint goes unscored.
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
import time
from pathlib import Path
from typing import Any, Optional

import ray
import torch

from distnmt.checkpoint import META_FILE, is_checkpoint_name, list_checkpoints, meta_path, read_meta
from distnmt.config import Config, config_from_dict
from distnmt.data.prepared import PreparedData
from distnmt.evaluate.final import finish_run
from distnmt.evaluate.policy import EarlyStopping, best_record, should_skip
from distnmt.evaluate.records import FinalReport, Record, RecordStore, ScoreRecord, SkipRecord
from distnmt.evaluate.score import EvalSplit, Scored, decode_settings, evaluate_checkpoint, load_split
from distnmt.evaluate.wandb_log import EvalLogger
from distnmt.io import write_json


class Evaluator:
    """Scores checkpoints on dev (and test at the end) as training reports them; early stopping."""

    def __init__(self, config: dict[str, Any], prepared_dir: str, run_dir: str) -> None:
        self.cfg: Config = config_from_dict(config)
        # One thread by default: the evaluator shares the machine with the trainers.
        torch.set_num_threads(self.cfg.eval.threads)
        self.device = "cuda" if self.cfg.eval.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.prepared = PreparedData(Path(prepared_dir), self.cfg.data.src_lang, self.cfg.data.tgt_lang)
        self.run_dir = Path(run_dir)
        self.split = self.cfg.eval.split
        self._splits: dict[str, EvalSplit] = {}
        self._load_split(self.split)  # now, so that a missing file fails the driver's ready()
        self.store = RecordStore(self.run_dir / "eval")
        self.early = EarlyStopping(self.cfg.eval.patience, self.cfg.eval.min_delta)
        self.logger = EvalLogger(self.cfg, self.run_dir)
        # One decode at a time; the other methods answer while it runs (threaded actor).
        self._lock = threading.RLock()
        self._busy: Optional[str] = None
        self._known: dict[str, int] = {}  # checkpoints heard of: name -> step
        # What training was told: the reason it stopped, kept so a restarted actor knows.
        self._stop_path = self.store.out_dir / "stop.json"
        self._stop_sent: Optional[str] = (
            json.loads(self._stop_path.read_text(encoding="utf-8"))["reason"] if self._stop_path.exists() else None
        )
        if self.store.scored or self.store.skipped:
            print(
                f"[evaluator] pid {os.getpid()}: resuming with {len(self.store.scored)} score(s) and "
                f"{len(self.store.skipped)} skip(s) from {self.store.out_dir}",
                flush=True,
            )

    # ------------------------------------------------------------------ data

    def _load_split(self, split: str) -> EvalSplit:
        """The split's raw text (first ``eval.max_sentences`` lines), loaded once."""
        if split not in self._splits:
            self._splits[split] = load_split(self.prepared, self.cfg, split)
        return self._splits[split]

    def ready(self) -> dict[str, Any]:
        """Called by the driver to surface start-up errors before training begins."""
        data = self._splits[self.split]
        return {"split": self.split, "sentences": len(data.sources), "scored": len(self.store.scored), "pid": os.getpid()}

    # ------------------------------------------------------------------ scoring

    def _settings(self, split: str) -> dict[str, Any]:
        return decode_settings(self.cfg.eval, len(self._load_split(split).sources))

    def _find(self, split: str, name: str) -> Optional[ScoreRecord]:
        """A persisted score of this checkpoint on this split with the current settings."""
        return self.store.find(split, name, self._settings(split))

    def _score(self, path: Path, name: str, split: str, origin: str, reported_at: Optional[float] = None,
               storage_path: Optional[str] = None, handed_at: Optional[float] = None) -> ScoreRecord:
        """Score the checkpoint at ``path`` (named ``name`` in the run) on ``split``, persist, log;
        or reuse a persisted score."""
        with self._lock:
            existing = self._find(split, name)
            if existing is not None:
                if origin == "training" and existing.origin != "training":
                    # Scored before by `distnmt evaluate` (or at the end of an earlier run): the
                    # same numbers, now a training score whose lag runs from this report to now.
                    existing = existing.for_report(reported_at, handed_at, time.time())
                    self.store.add_score(existing)
                return existing
            data = self._load_split(split)
            self._busy = name
            try:
                scored = evaluate_checkpoint(path, name, data, self.cfg.eval, self.store, origin, self.device,
                                             storage_path=storage_path, reported_at=reported_at, handed_at=handed_at)
            finally:
                self._busy = None
            self._log(scored, data)
            return scored.record

    def _log(self, scored: Scored, data: EvalSplit) -> None:
        record = scored.record
        lag = f", {record.lag_seconds:.1f} s after report" if record.lag_seconds is not None else ""
        xent = f", xent {record.xent:.3f}" if record.xent is not None else ""
        print(
            f"[evaluator] {record.test_set} {record.checkpoint} (step {record.step}, {record.sentences} "
            f"sentences, beam {record.beam_size}, {record.sentences_per_s:.1f} sent/s{lag}{xent}): {record.bleu_line}",
            flush=True,
        )
        try:
            self.logger.log_scores(record, data.sources, data.references, scored.hypotheses)
        except Exception as err:  # W&B trouble must never cost a score (it is already persisted)
            print(f"[evaluator] W&B logging failed: {type(err).__name__}: {err}", flush=True)

    # ------------------------------------------------------------------ the training hook

    def score_checkpoint(self, checkpoint: "ray.train.Checkpoint", handed_at: Optional[float] = None) -> Record:
        """A checkpoint Ray Train reported: score it, or under policy "newest" perhaps skip it.

        ``handed_at``: when the validation hook started (recorded, to tell Ray's share
        of the lag from the evaluator's). Returns the score record, or a
        :class:`SkipRecord` naming the newer checkpoint that made this one not worth scoring.
        """
        name = posixpath.basename(checkpoint.path.rstrip("/"))
        step = self._step_of(checkpoint.filesystem, checkpoint.path)
        self._known[name] = step
        reported_at = _mtime(checkpoint.filesystem, posixpath.join(checkpoint.path, META_FILE))
        with self._lock:  # decided at the checkpoint's turn: what is known then is what counts
            if self._find(self.split, name) is None:
                skip = self.store.find_skip(self.split, name)
                if skip is not None:
                    return skip  # re-sent after a restart: skipped once is enough
                self._discover(checkpoint)
                newer = should_skip(self.cfg.eval.policy, step, self._known)
                if newer is not None:
                    return self._skip(name, step, newer, reported_at, checkpoint.path)
            # Local storage: the directory itself; cloud storage: a local copy.
            with checkpoint.as_directory() as directory:
                return self._score(Path(directory), name, self.split, origin="training",
                                   reported_at=reported_at, storage_path=checkpoint.path, handed_at=handed_at)

    def _skip(self, name: str, step: int, newer: str, reported_at: Optional[float], path: str) -> SkipRecord:
        record = SkipRecord(checkpoint=name, step=step, split=self.split, newer=newer, policy=self.cfg.eval.policy,
                            reported_at=reported_at, skipped_at=time.time(), path=path, evaluator_pid=os.getpid())
        self.store.add_skip(record)
        print(f"[evaluator] skipped {name} (step {step}): {newer} is newer (eval.policy: newest)", flush=True)
        return record

    def _step_of(self, filesystem: Any, path: str) -> int:
        with filesystem.open_input_stream(posixpath.join(path, META_FILE)) as stream:
            return int(json.loads(stream.read().decode("utf-8"))["step"])

    def _discover(self, checkpoint: "ray.train.Checkpoint") -> None:
        """Learn of checkpoints already in the run's storage directory (possibly queued behind this one)."""
        import pyarrow.fs

        filesystem, parent = checkpoint.filesystem, posixpath.dirname(checkpoint.path.rstrip("/"))
        try:
            infos = filesystem.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
        except OSError:
            return  # storage unreachable right now: decide on what the calls told us
        for info in infos:
            name = info.base_name
            if info.type != pyarrow.fs.FileType.Directory or not is_checkpoint_name(name) or name in self._known:
                continue
            try:
                self._known[name] = self._step_of(filesystem, info.path)
            except (OSError, ValueError, KeyError):
                continue  # still being uploaded: the next decision sees it

    # ------------------------------------------------------------------ queries

    def training_records(self) -> list[ScoreRecord]:
        """Scores of this run's reported checkpoints on the evaluation split, with the current settings."""
        return self.store.training_scores(self.split, self._settings(self.split))

    def results(self) -> list[ScoreRecord]:
        """This run's scores on the evaluation split, in step order."""
        return self.training_records()

    def skipped(self) -> list[SkipRecord]:
        return list(self.store.skipped)

    def status(self) -> dict[str, Any]:
        """What the actor is doing now (answers while it decodes)."""
        return {"pid": os.getpid(), "decoding": self._busy, "scored": len(self.store.scored),
                "skipped": len(self.store.skipped)}

    def stop_reason(self) -> Optional[str]:
        """Why training should stop now (early stopping), or None to go on; asked by training rank 0.

        Derived from the persisted scores, so a restarted evaluator gives the same
        answer. The first reason handed out is kept in ``eval/stop.json``: it is why
        the run ended, which :meth:`finalize` reports.
        """
        reason = self.early.reason(self.training_records())
        if reason and self._stop_sent is None:
            self._stop_sent = reason
            write_json(self._stop_path, {"reason": reason, "at": time.time()}, indent=None)
            print(f"[evaluator] telling training to stop: {reason}", flush=True)
        return reason

    def best(self) -> Optional[ScoreRecord]:
        return best_record(self.training_records())

    # ------------------------------------------------------------------ end of the run

    def finalize(self) -> list[ScoreRecord]:
        """End-of-run work, called by the driver once training has ended.

        The best checkpoint by dev BLEU is scored on the test set and drawn (the
        paper's Figures 2 and 3); the outcome goes to ``eval/final.json`` and W&B.
        Returns this run's scores on the evaluation split (see :meth:`final` for the rest).
        Safe to call again: every score is reused.
        """
        with self._lock:
            self._catch_up()
            final = finish_run(
                self.training_records(), self.cfg.eval, self.run_dir, self.store.out_dir, self._stop_sent,
                skipped=[r.checkpoint for r in self.store.skipped if r.split == self.split],
                score_test=lambda directory, best: self._score(directory, best.checkpoint, "test", origin="final"),
                load_split=self._load_split, device=self.device,
            )
            write_json(self.store.out_dir / "final.json", final.to_dict())
            try:
                if final.best is not None:
                    self.logger.log_final(final.best, final.test, [self.run_dir / f for f in final.figures])
                self.logger.finish()
            except Exception as err:  # W&B trouble must not fail the run's end
                print(f"[evaluator] W&B logging failed: {type(err).__name__}: {err}", flush=True)
            return self.results()

    def _catch_up(self) -> None:
        """Score the run's checkpoints that no validation task ever handed over.

        When a worker failure restarts the run, Ray Train cancels the validation
        in flight and does not queue it again within the same run, so a reported
        checkpoint could go unscored. Its directory is in the run directory; it is
        scored here (or, under policy "newest", recorded as skipped for the newest);
        one scored by ``distnmt evaluate`` meanwhile is re-issued as a training score.
        """
        on_disk = sorted(list_checkpoints(self.run_dir), key=lambda p: int(read_meta(p)["step"]))
        for path in on_disk:
            existing = self._find(self.split, path.name)
            if (existing is not None and existing.origin == "training") or self.store.find_skip(self.split, path.name):
                continue
            step = int(read_meta(path)["step"])
            reported_at = meta_path(path).stat().st_mtime
            if existing is not None:  # scored by `distnmt evaluate`: re-issued, not decoded again
                self._score(path, path.name, self.split, origin="training", reported_at=reported_at)
                continue
            if self.cfg.eval.policy == "newest" and path != on_disk[-1]:
                self._skip(path.name, step, on_disk[-1].name, reported_at, str(path))
                continue
            print(f"[evaluator] {path.name} was reported but never handed over (validation cancelled by a "
                  "restart?): scoring it now", flush=True)
            self._score(path, path.name, self.split, origin="training", reported_at=reported_at)

    def final(self) -> FinalReport:
        """The outcome of :meth:`finalize` (best, test, figures, stop reason, skipped), from eval/final.json."""
        path = self.store.out_dir / "final.json"
        return FinalReport.from_dict(json.loads(path.read_text(encoding="utf-8")) if path.exists() else {})


def _mtime(filesystem: Any, path: str) -> Optional[float]:
    """When ``path`` landed in storage: Ray uploads a checkpoint just before it registers the report."""
    try:
        info = filesystem.get_file_info(path)
    except OSError:
        return None
    return info.mtime.timestamp() if info.mtime is not None else None
