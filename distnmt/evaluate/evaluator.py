"""The evaluator: scores each reported checkpoint with sacreBLEU while training goes on.

:class:`Evaluator` is a plain class (testable without Ray); the driver runs it
as a named, threaded Ray actor with its own resources (``eval.num_cpus``,
``eval.num_gpus``), restarted by Ray if it dies. Ray Train's checkpoint-validation
hook (:func:`score_with_evaluator`, run as a Ray task after each
``ray.train.report(..., validation=True)``) hands every new checkpoint to the
actor and returns its scores, which Ray merges into that checkpoint's metrics
(it lives in :mod:`distnmt.evaluate.hook`, light to import).
Training never waits: the hook runs beside the workers, and Ray waits for the
pending ones when training ends.

What the actor does, and where it is decided:

- falling behind: Ray runs one validation at a time and queues the rest, so
  the actor decides when a checkpoint's turn comes (``eval.policy``, see
  :mod:`distnmt.evaluate.policy`); it learns of newer checkpoints from the
  checkpoints handed to it and from the run's storage directory;
- early stopping: :meth:`Evaluator.stop_reason`, asked by training rank 0
  after each report, says why to stop once ``eval.patience`` scored
  checkpoints have not beaten the best dev BLEU;
- the end of the run, :meth:`Evaluator.finalize`: the best checkpoint by dev
  BLEU scored on newstest2014, the paper's figures, ``eval/final.json``, W&B;
- restarts: every score is persisted at once (:mod:`distnmt.evaluate.records`),
  a restarted actor reads them back, and Ray retries the call that was in
  flight (``max_task_retries``), so no reported checkpoint goes unscored.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import ray
import torch

from distnmt.checkpoint import read_meta
from distnmt.config import Config, config_from_dict
from distnmt.data.custom import own_split_name
from distnmt.data.prepared import PreparedData
from distnmt.evaluate.policy import EarlyStopping, Record, best_record, should_skip
from distnmt.evaluate.hook import score_with_evaluator  # noqa: F401  (the driver imports it from here)
from distnmt.evaluate.records import RecordStore, write_text_atomic
from distnmt.evaluate.scoring import score_corpus
from distnmt.evaluate.translator import translator_from_checkpoint
from distnmt.evaluate.wandb_log import EvalLogger

# Decoding settings a score depends on (and the BLEU tokenizer, issue 17): a record is
# reused only when all match.
DECODE_KEYS = ("beam_size", "alpha", "max_len_a", "max_len_b", "bleu_tokenize")
# Attention examples (Figure 3): the first dev sentences of a readable length.
EXAMPLE_WORDS = (10, 25)
# Seconds to wait before each decode. A test seam, not a setting: the tiny models of
# the tests decode in a fraction of a second, and the tests need an evaluator that
# falls behind training (policy "newest") or can be caught mid-decode (restart).
SLOWDOWN_ENV = "DISTNMT_EVAL_SLOWDOWN_S"


@dataclass
class SplitData:
    """One evaluation split held in memory: raw sources and references."""

    name: str  # "dev" or "test"
    test_set: str  # e.g. "newstest2013"
    sources: list[str]
    references: list[str]


def eval_set_name(path_or_prefix: str) -> str:
    """'dev/newstest2013' -> 'newstest2013'; 'test/newstest2014-fren-src.en.sgm' -> 'newstest2014'."""
    found = re.search(r"newstest\d{4}", path_or_prefix)
    return found.group(0) if found else Path(path_or_prefix).name.split(".")[0]


class Evaluator:
    """Scores checkpoints on dev (and test at the end), persists and logs every score."""

    def __init__(self, config: dict[str, Any], prepared_dir: str, run_dir: str) -> None:
        self.cfg: Config = config_from_dict(config)
        # One thread by default: the evaluator shares the machine with the trainers.
        torch.set_num_threads(self.cfg.eval.threads)
        self.device = "cuda" if self.cfg.eval.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.prepared = PreparedData(Path(prepared_dir), self.cfg.data.src_lang, self.cfg.data.tgt_lang)
        self.manifest = self.prepared.manifest
        self.run_dir = Path(run_dir)
        self.split = self.cfg.eval.split
        self._splits: dict[str, SplitData] = {}
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

    def _load_split(self, split: str) -> SplitData:
        """The split's raw text (first ``eval.max_sentences`` lines), loaded once."""
        if split not in self._splits:
            sources, references = self.prepared.eval_text(split)
            limit = self.cfg.eval.max_sentences
            if limit is not None:
                sources, references = sources[:limit], references[:limit]
            own = self.cfg.data.dev if split == "dev" else self.cfg.data.test  # a user's own files (issue 17)
            name = (own_split_name(own) if own is not None
                    else eval_set_name(self.cfg.data.dev_prefix if split == "dev" else self.cfg.data.test_src))
            self._splits[split] = SplitData(split, name, sources, references)
        return self._splits[split]

    def ready(self) -> dict[str, Any]:
        """Called by the driver to surface start-up errors before training begins."""
        data = self._splits[self.split]
        return {"split": self.split, "sentences": len(data.sources), "scored": len(self.store.scored), "pid": os.getpid()}

    # ------------------------------------------------------------------ scoring

    def _settings(self, split: str) -> dict[str, Any]:
        settings = {key: getattr(self.cfg.eval, key) for key in DECODE_KEYS}
        settings["sentences"] = len(self._load_split(split).sources)
        return settings

    def _find(self, split: str, name: str) -> Optional[Record]:
        """A persisted score of this checkpoint on this split with the current settings."""
        settings = self._settings(split)
        for record in self.store.scored:
            # Keys missing from older records do not disqualify them.
            if record["split"] == split and record["checkpoint"] == name and all(
                record.get(key, value) == value for key, value in settings.items()
            ):
                return record
        return None

    def score(self, checkpoint_dir: str, split: Optional[str] = None) -> Record:
        """Score a checkpoint directory now, whatever the policy (``distnmt evaluate`` uses this)."""
        path = Path(checkpoint_dir)
        return self._score(path, path.name, split or self.split, origin="evaluate")

    def _score(self, path: Path, name: str, split: str, origin: str, reported_at: Optional[float] = None,
               storage_path: Optional[str] = None, handed_at: Optional[float] = None) -> Record:
        """Decode ``split`` with the checkpoint at ``path`` (named ``name`` in the run), score,
        persist, log; or reuse a persisted score."""
        with self._lock:
            existing = self._find(split, name)
            if existing is not None:
                if origin == "training" and existing.get("origin", "training") != "training":
                    # Scored before by `distnmt evaluate`: the same numbers, now also a training score.
                    existing = {**existing, "origin": "training", "reported_at": reported_at}
                    self.store.add_score(existing)
                return existing
            # No vocabulary check against the prepared data: the checkpoint carries its own
            # sentencepiece models and is scored on raw text, so any prepared copy of the
            # split will do (e.g. an old checkpoint after the data was prepared again).
            meta = read_meta(path)
            data = self._load_split(split)
            self._busy = name
            try:
                record, hypotheses = self._decode_and_score(path, name, meta, data, origin)
            finally:
                self._busy = None
            record["path"] = storage_path or str(path)
            record["reported_at"] = reported_at
            record["handed_at"] = handed_at
            record["lag_seconds"] = round(record["scored_at"] - reported_at, 2) if reported_at else None
            self.store.add_score(record)
            self._log(record, data, hypotheses)
            return record

    def _decode_and_score(self, path: Path, name: str, meta: dict[str, Any], data: SplitData,
                          origin: str) -> tuple[Record, list[str]]:
        time.sleep(float(os.environ.get(SLOWDOWN_ENV, "0")))
        started = time.time()
        translator = translator_from_checkpoint(path, self.cfg.eval, device=self.device)
        loaded, cpu_loaded = time.time(), time.process_time()
        hypotheses = translator.translate(data.sources)
        decoded, cpu_decoded = time.time(), time.process_time()
        scores = score_corpus(hypotheses, data.references, self.cfg.eval.bleu_tokenize)
        # Training and end-of-run scores keep the plain name the run's readers expect;
        # `distnmt evaluate` may use other settings, so its file says which.
        suffix = "" if origin != "evaluate" else f".beam{self.cfg.eval.beam_size}.n{len(hypotheses)}"
        hyp_path = self.store.out_dir / f"{data.name}.{name}{suffix}.hyp"
        write_text_atomic(hyp_path, "".join(h + "\n" for h in hypotheses))
        decode_seconds = decoded - loaded
        record: Record = {
            "checkpoint": name,
            "step": int(meta["step"]),
            "split": data.name,
            "test_set": data.test_set,
            "origin": origin,
            **self._settings(data.name),
            "hyp_file": hyp_path.name,
            "load_seconds": round(loaded - started, 2),
            "decode_seconds": round(decode_seconds, 2),
            "sentences_per_s": round(len(hypotheses) / max(decode_seconds, 1e-9), 2),
            # CPU time as well: on a shared machine wall time says more about the neighbours.
            "decode_cpu_seconds": round(cpu_decoded - cpu_loaded, 2),
            "started_at": started,
            "scored_at": time.time(),
            "evaluator_pid": os.getpid(),
            **scores.to_dict(),
        }
        if "averaged_from" in meta:
            record["averaged_from"] = meta["averaged_from"]
        return record, hypotheses

    def _log(self, record: Record, data: SplitData, hypotheses: list[str]) -> None:
        lag = f", {record['lag_seconds']:.1f} s after report" if record.get("lag_seconds") is not None else ""
        print(
            f"[evaluator] {record['test_set']} {record['checkpoint']} (step {record['step']}, {record['sentences']} "
            f"sentences, beam {record['beam_size']}, {record['sentences_per_s']:.1f} sent/s{lag}): {record['bleu_line']}",
            flush=True,
        )
        try:
            self.logger.log_scores(record, data.sources, data.references, hypotheses)
        except Exception as err:  # W&B trouble must never cost a score (it is already persisted)
            print(f"[evaluator] W&B logging failed: {type(err).__name__}: {err}", flush=True)

    # ------------------------------------------------------------------ the training hook

    def score_checkpoint(self, checkpoint: "ray.train.Checkpoint", handed_at: Optional[float] = None) -> Record:
        """A checkpoint Ray Train reported: score it, or under policy "newest" perhaps skip it.

        ``handed_at``: when the validation hook started (recorded, to tell Ray's share
        of the lag from the evaluator's). Returns the score record, or a record with
        ``"skipped": True`` naming the newer checkpoint that made this one not worth scoring.
        """
        name = posixpath.basename(checkpoint.path.rstrip("/"))
        step = self._step_of(checkpoint.filesystem, checkpoint.path)
        self._known[name] = step
        reported_at = _mtime(checkpoint.filesystem, posixpath.join(checkpoint.path, "meta.json"))
        with self._lock:  # decided at the checkpoint's turn: what is known then is what counts
            if self._find(self.split, name) is None:
                for skip in self.store.skipped:
                    if skip["split"] == self.split and skip["checkpoint"] == name:
                        return skip  # re-sent after a restart: skipped once is enough
                self._discover(checkpoint)
                newer = should_skip(self.cfg.eval.policy, step, self._known)
                if newer is not None:
                    return self._skip(name, step, newer, reported_at, checkpoint.path)
            # Local storage: the directory itself; cloud storage: a local copy.
            with checkpoint.as_directory() as directory:
                return self._score(Path(directory), name, self.split, origin="training",
                                   reported_at=reported_at, storage_path=checkpoint.path, handed_at=handed_at)

    def _skip(self, name: str, step: int, newer: str, reported_at: Optional[float], path: str) -> Record:
        record = {
            "checkpoint": name, "step": step, "split": self.split, "skipped": True, "policy": self.cfg.eval.policy,
            "newer": newer, "reported_at": reported_at, "skipped_at": time.time(), "path": path,
            "evaluator_pid": os.getpid(),
        }
        self.store.add_skip(record)
        print(f"[evaluator] skipped {name} (step {step}): {newer} is newer (eval.policy: newest)", flush=True)
        return record

    def _step_of(self, filesystem: Any, path: str) -> int:
        with filesystem.open_input_stream(posixpath.join(path, "meta.json")) as stream:
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
            if info.type != pyarrow.fs.FileType.Directory or not name.startswith("checkpoint_") or name in self._known:
                continue
            try:
                self._known[name] = self._step_of(filesystem, info.path)
            except (OSError, ValueError, KeyError):
                continue  # still being uploaded: the next decision sees it

    # ------------------------------------------------------------------ queries

    def training_records(self) -> list[Record]:
        """Scores of this run's reported checkpoints on the evaluation split, with the current settings."""
        settings = self._settings(self.split)
        return [
            r for r in self.store.scored
            if r["split"] == self.split and r.get("origin", "training") == "training"
            and all(r.get(key, value) == value for key, value in settings.items())
        ]

    def results(self) -> list[Record]:
        """This run's scores on the evaluation split, in step order."""
        return sorted(self.training_records(), key=lambda r: r["step"])

    def skipped(self) -> list[Record]:
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
            write_text_atomic(self._stop_path, json.dumps({"reason": reason, "at": time.time()}) + "\n")
            print(f"[evaluator] telling training to stop: {reason}", flush=True)
        return reason

    def best(self) -> Optional[Record]:
        return best_record(self.training_records())

    # ------------------------------------------------------------------ end of the run

    def finalize(self) -> list[Record]:
        """End-of-run work, called by the driver once training has ended.

        The best checkpoint by dev BLEU is scored on the test set and drawn (the
        paper's Figures 2 and 3); the outcome goes to ``eval/final.json`` and W&B.
        Returns this run's scores on the evaluation split (see :meth:`final` for the rest).
        Safe to call again: every score is reused.
        """
        with self._lock:
            self._catch_up()
            final = self._finalize()
            write_text_atomic(self.store.out_dir / "final.json", json.dumps(final, indent=1) + "\n")
            try:
                if final["best"] is not None:
                    self.logger.log_final(final["best"], final["test"], [self.run_dir / f for f in final["figures"]])
                self.logger.finish()
            except Exception as err:  # W&B trouble must not fail the run's end
                print(f"[evaluator] W&B logging failed: {type(err).__name__}: {err}", flush=True)
            return self.results()

    def _catch_up(self) -> None:
        """Score the run's checkpoints that no validation task ever handed over.

        When a worker failure restarts the run, Ray Train cancels the validation
        in flight and does not queue it again within the same run, so a reported
        checkpoint could go unscored. Its directory is in the run directory; it is
        scored here (or, under policy "newest", recorded as skipped for the newest).
        """
        on_disk = sorted(
            (p for p in self.run_dir.glob("checkpoint_*") if (p / "meta.json").is_file()),
            key=lambda p: int(read_meta(p)["step"]),
        )
        skipped = {r["checkpoint"] for r in self.store.skipped if r["split"] == self.split}
        for path in on_disk:
            if self._find(self.split, path.name) is not None or path.name in skipped:
                continue
            step = int(read_meta(path)["step"])
            reported_at = (path / "meta.json").stat().st_mtime
            if self.cfg.eval.policy == "newest" and path != on_disk[-1]:
                self._skip(path.name, step, on_disk[-1].name, reported_at, str(path))
                continue
            print(f"[evaluator] {path.name} was reported but never handed over (validation cancelled by a "
                  "restart?): scoring it now", flush=True)
            self._score(path, path.name, self.split, origin="training", reported_at=reported_at)

    def final(self) -> dict[str, Any]:
        """The outcome of :meth:`finalize` (best, test, figures, stop reason, skipped), from eval/final.json."""
        path = self.store.out_dir / "final.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def _finalize(self) -> dict[str, Any]:
        best = self.best()
        final: dict[str, Any] = {
            "best": best, "test": None, "figures": [], "stop_reason": self._stop_sent,
            "skipped": [r["checkpoint"] for r in self.store.skipped if r["split"] == self.split],
            "lag_seconds": _lag_summary(self.training_records()),
        }
        if best is None:
            print("[evaluator] no checkpoint was scored: nothing to finalize", flush=True)
            return final
        with self._checkpoint_dir(best) as directory:
            if directory is None:
                print(f"[evaluator] best checkpoint {best['checkpoint']} is gone from {best.get('path')} "
                      "(deleted by train.keep_checkpoints?): no test score, no figures", flush=True)
                return final
            if self.cfg.eval.test_at_end and self.split != "test":
                test = self._score(directory, best["checkpoint"], "test", origin="final")
                final["test"] = test
                print(f"[evaluator] best by {best['test_set']} BLEU: {best['checkpoint']} (step {best['step']}, "
                      f"{best['bleu']:.2f}); {test['test_set']}: {test['bleu_line']}", flush=True)
            if self.cfg.eval.figures:
                final["figures"] = [str(p.relative_to(self.run_dir)) for p in self._figures(best, final["test"], directory)]
        return final

    @contextlib.contextmanager
    def _checkpoint_dir(self, record: Record) -> Iterator[Optional[Path]]:
        """A local directory holding the record's checkpoint (fetched from cloud storage if need be)."""
        path = str(record.get("path") or self.run_dir / record["checkpoint"])
        if Path(path).is_dir():
            yield Path(path)
            return
        try:
            checkpoint = ray.train.Checkpoint(path)
            exists = checkpoint.filesystem.get_file_info(posixpath.join(checkpoint.path, "meta.json")).is_file
        except (OSError, ValueError):
            exists = False
        if not exists:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def _figures(self, best: Record, test: Optional[Record], directory: Path) -> list[Path]:
        """Figure 2 (BLEU by source length, on test if scored) and Figure 3 (attention) for ``best``."""
        # Late: matplotlib takes a second to import, needed once per run, and a
        # restarted actor should be back to scoring as soon as it can.
        from distnmt.evaluate.figures import bleu_by_length, plot_attention, plot_bleu_by_length

        out = self.run_dir / "figures"
        scored = test or best
        data = self._load_split(scored["split"])
        hyp_file = self.store.out_dir / scored.get("hyp_file", f"{scored['split']}.{scored['checkpoint']}.hyp")
        hypotheses = hyp_file.read_text(encoding="utf-8").splitlines()
        bins = bleu_by_length(data.sources, hypotheses, data.references)
        title = (f"{best['checkpoint']} (step {best['step']}) on {scored['test_set']}: "
                 f"BLEU {scored['bleu']:.2f}, beam {scored['beam_size']}")
        paths = [plot_bleu_by_length(bins, out / "bleu_by_length.png", title)]
        if self.cfg.eval.attention_examples:
            dev = self._load_split(self.split)
            picks = example_indices(dev.sources, self.cfg.eval.attention_examples)
            translator = translator_from_checkpoint(directory, self.cfg.eval, device=self.device)
            for index, alignment in zip(picks, translator.attention([dev.sources[i] for i in picks])):
                paths.append(plot_attention(
                    alignment.src_pieces, alignment.tgt_pieces, alignment.weights,
                    out / f"attention_{dev.name}{index:04d}.png",
                    f"{dev.test_set} #{index + 1}, {best['checkpoint']}:\n{alignment.translation}",
                ))
        print(f"[evaluator] figures: {', '.join(str(p.relative_to(self.run_dir)) for p in paths)}", flush=True)
        return paths


def example_indices(sources: list[str], count: int, words: tuple[int, int] = EXAMPLE_WORDS) -> list[int]:
    """The fixed sentences drawn in Figure 3: the first ``count`` of ``words`` words (else the first ones)."""
    low, high = words
    picks = [i for i, s in enumerate(sources) if low <= len(s.split()) <= high][:count]
    if len(picks) < count:  # a tiny split: take what there is
        picks += [i for i in range(len(sources)) if i not in picks][: count - len(picks)]
    return sorted(picks)


def _mtime(filesystem: Any, path: str) -> Optional[float]:
    """When ``path`` landed in storage: Ray uploads a checkpoint just before it registers the report."""
    try:
        info = filesystem.get_file_info(path)
    except OSError:
        return None
    return info.mtime.timestamp() if info.mtime is not None else None


def _lag_summary(records: list[Record]) -> Optional[dict[str, float]]:
    lags = [r["lag_seconds"] for r in records if r.get("lag_seconds") is not None]
    if not lags:
        return None
    return {"mean": round(sum(lags) / len(lags), 2), "max": round(max(lags), 2), "checkpoints": len(lags)}
