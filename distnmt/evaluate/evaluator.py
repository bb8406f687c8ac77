"""The evaluator: scores each reported checkpoint with sacreBLEU while training goes on.

:class:`Evaluator` is a plain class (testable without Ray); the driver runs it
as a named Ray actor with its own resources. Ray Train's checkpoint-validation
hook (:func:`score_with_evaluator`, run as a Ray task after each
``ray.train.report(..., validation=True)``) hands every new checkpoint to the
actor and returns its scores, which Ray merges into that checkpoint's metrics.
Training never waits: the hook runs beside the workers, and Ray waits for the
pending ones when training ends.

Every score is appended to ``<run_dir>/eval/<split>.jsonl`` at once, so an
evaluator that restarts knows what it already scored.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import ray
import torch

from distnmt.checkpoint import check_vocab, read_meta
from distnmt.config import config_from_dict
from distnmt.data.corpus import read_lines
from distnmt.data.prepare import load_manifest
from distnmt.evaluate.scoring import score_corpus
from distnmt.evaluate.translator import translator_from_checkpoint

SPLIT_NAMES = {"dev": "dev", "test": "test"}


class Evaluator:
    """Holds one evaluation split in memory and scores checkpoints on it."""

    def __init__(self, config: dict[str, Any], prepared_dir: str, run_dir: str) -> None:
        self.cfg = config_from_dict(config)
        # One thread by default: the evaluator shares the machine with the trainers.
        torch.set_num_threads(self.cfg.eval.threads)
        prepared = Path(prepared_dir)
        self.manifest = load_manifest(prepared)
        split = self.cfg.eval.split
        self.split = split
        self.sources = read_lines(prepared / f"{split}.{self.cfg.data.src_lang}")
        self.references = read_lines(prepared / f"{split}.{self.cfg.data.tgt_lang}")
        if self.cfg.eval.max_sentences is not None:
            self.sources = self.sources[: self.cfg.eval.max_sentences]
            self.references = self.references[: self.cfg.eval.max_sentences]
        self.out_dir = Path(run_dir) / "eval"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = self.out_dir / f"{split}.jsonl"
        self.records: list[dict[str, Any]] = self._read_records()
        self._stop_reason: Optional[str] = None

    def _read_records(self) -> list[dict[str, Any]]:
        """Scores persisted by an earlier incarnation of this evaluator."""
        if not self.results_path.exists():
            return []
        records = []
        for line in self.results_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash mid-write; that checkpoint is rescored
        return records

    def ready(self) -> dict[str, Any]:
        """Called by the driver to surface start-up errors before training begins."""
        return {"split": self.split, "sentences": len(self.sources), "scored": len(self.records)}

    def score(self, checkpoint_dir: str) -> dict[str, Any]:
        """Decode the split with the checkpoint, score it, persist and return the record."""
        path = Path(checkpoint_dir)
        for record in self.records:
            # Already scored with these settings (e.g. re-sent after a restart).
            if (record["checkpoint"], record["beam_size"], record["sentences"]) == (
                path.name, self.cfg.eval.beam_size, len(self.sources)
            ):
                return record
        check_vocab(read_meta(path), self.manifest["spm_sha256"], path)
        started = time.time()
        translator = translator_from_checkpoint(path, self.cfg.eval)
        hypotheses = translator.translate(self.sources)
        scores = score_corpus(hypotheses, self.references)
        seconds = time.time() - started
        (self.out_dir / f"{self.split}.{path.name}.hyp").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
        record = {
            "checkpoint": path.name,
            "step": int(read_meta(path)["step"]),
            "split": self.split,
            "test_set": self.cfg.data.dev_prefix.rsplit("/", 1)[-1] if self.split == "dev" else "newstest2014",
            "beam_size": self.cfg.eval.beam_size,
            "decode_seconds": round(seconds, 2),
            "scored_at": time.time(),
            **scores.to_dict(),
        }
        self._append(record)
        print(
            f"[evaluator] {record['test_set']} {path.name} (step {record['step']}, "
            f"{scores.sentences} sentences, beam {self.cfg.eval.beam_size}, {seconds:.1f} s): {scores.bleu_line}",
            flush=True,
        )
        return record

    def _append(self, record: dict[str, Any]) -> None:
        # fsync: a score once returned to Ray must survive an evaluator crash.
        with open(self.results_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)

    def score_checkpoint(self, checkpoint: "ray.train.Checkpoint") -> dict[str, Any]:
        """Score a Ray Train checkpoint (fetched to local disk if it lives in cloud storage)."""
        with checkpoint.as_directory() as directory:
            return self.score(directory)

    def results(self) -> list[dict[str, Any]]:
        return list(self.records)

    def stop_reason(self) -> Optional[str]:
        """Why training should stop now (e.g. early stopping), or None to go on."""
        return self._stop_reason

    def finalize(self) -> list[dict[str, Any]]:
        """End-of-run work, called by the driver once training has ended; returns every record."""
        return self.results()


def score_with_evaluator(checkpoint: "ray.train.Checkpoint", evaluator_name: str, namespace: str) -> dict[str, Any]:
    """Ray Train validation function: hand the checkpoint to the evaluator actor.

    Returns the metrics Ray merges into the checkpoint's own (so CheckpointConfig
    can rank checkpoints by dev BLEU).
    """
    actor = ray.get_actor(evaluator_name, namespace=namespace)
    record = ray.get(actor.score_checkpoint.remote(checkpoint))
    return {"bleu": record["bleu"], "chrf": record["chrf"]}
