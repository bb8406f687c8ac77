"""The evaluator's decisions, as pure functions of its records (no Ray, no torch).

Kept apart from the actor so that each rule can be tested on made-up scores:

- which checkpoint to score when the evaluator falls behind (``eval.policy``);
- which scored checkpoint is the best (highest dev BLEU; the earliest on a tie);
- when to stop training (``eval.patience`` scored checkpoints without a dev BLEU
  higher than the best by more than ``eval.min_delta``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from distnmt.evaluate.records import ScoreRecord


def newer_than(step: int, known: dict[str, int]) -> list[str]:
    """Names of the known checkpoints (name -> step) later than ``step``, oldest first."""
    return [name for name, other in sorted(known.items(), key=lambda item: item[1]) if other > step]


def should_skip(policy: str, step: int, known: dict[str, int]) -> Optional[str]:
    """Under policy "newest", the newest checkpoint that makes this one not worth scoring.

    Ray Train runs one validation at a time and queues the rest in report order, so
    when the evaluator falls behind, a checkpoint's turn comes while newer ones wait.
    "every" scores them all; "newest" skips any checkpoint for which a newer one is
    already known, so the evaluator catches up with training. The newest checkpoint
    is never skipped: nothing newer is known when its turn comes.
    """
    if policy == "every":
        return None
    if policy != "newest":
        raise ValueError(f"unknown evaluation policy {policy!r} (expected 'every' or 'newest')")
    newer = newer_than(step, known)
    return newer[-1] if newer else None


def best_record(records: list[ScoreRecord]) -> Optional[ScoreRecord]:
    """The record with the highest BLEU; the earliest step wins a tie (it was there first)."""
    if not records:
        return None
    return max(sorted(records, key=lambda r: r.step), key=lambda r: r.bleu)


@dataclass
class EarlyStopping:
    """Patience over scored checkpoints, in training-step order."""

    patience: Optional[int]  # None: never stop
    min_delta: float = 0.0

    def since_best(self, records: list[ScoreRecord]) -> tuple[Optional[ScoreRecord], int]:
        """The best record so far and how many scored checkpoints came after it without beating it."""
        best: Optional[ScoreRecord] = None
        waited = 0
        for record in sorted(records, key=lambda r: r.step):
            if best is None or record.bleu > best.bleu + self.min_delta:
                best, waited = record, 0
            else:
                waited += 1
        return best, waited

    def reason(self, records: list[ScoreRecord]) -> Optional[str]:
        """One sentence saying why training should stop now, or None to go on."""
        if self.patience is None:
            return None
        best, waited = self.since_best(records)
        if best is None or waited < self.patience:
            return None
        last = max(records, key=lambda r: r.step)
        gain = f" by more than {self.min_delta:g}" if self.min_delta else ""
        return (
            f"early stopping: {best.test_set or 'dev'} BLEU has not improved{gain} for {waited} scored "
            f"checkpoint(s) (patience {self.patience}); best {best.bleu:.2f} at step {best.step} "
            f"({best.checkpoint}), last {last.bleu:.2f} at step {last.step}"
        )
