"""Ray Train's checkpoint-validation hook: hands each reported checkpoint to the evaluator actor.

Kept in its own module that imports nothing but Ray (and, to unpickle the answer,
the small records module): Ray runs the hook as a task in a fresh worker process,
which imports the hook's module first. Importing the
evaluator there (torch, sacreBLEU, matplotlib: 2-4 s on a busy 2-core machine)
would add that much to every checkpoint's evaluation lag.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from ray.train import Checkpoint


def score_with_evaluator(checkpoint: "Checkpoint", evaluator_name: str, namespace: str) -> dict[str, Any]:
    """Ray Train validation function: the evaluator actor's scores for this checkpoint.

    Returns the metrics Ray merges into the checkpoint's own (so CheckpointConfig
    can rank checkpoints by dev BLEU). A checkpoint skipped under policy "newest"
    gets no BLEU, only ``eval_skipped`` (Ray then ranks it below every scored one).
    If the actor dies meanwhile, Ray restarts it and retries this call on the new
    one (the driver starts it with max_restarts and max_task_retries).
    """
    handed_at = time.time()  # splits the evaluation lag into Ray's scheduling and the actor's work
    actor = ray.get_actor(evaluator_name, namespace=namespace)
    # A ScoreRecord or a SkipRecord (distnmt.evaluate.records: light, imported by unpickling).
    record = ray.get(actor.score_checkpoint.remote(checkpoint, handed_at=handed_at))
    if getattr(record, "skipped", False):
        return {"eval_skipped": True}
    metrics = {"bleu": record.bleu, "chrf": record.chrf}
    if record.xent is not None:
        metrics["xent"] = record.xent  # dev cross-entropy per target subword
    return metrics
