"""When to checkpoint and when to stop: small objects the training loop asks each step.

Every rank must take the same decision at the same step (a rank that stops or
checkpoints alone hangs the others in their next collective), so the per-step
facts that can differ between ranks (this rank's loss was not finite; rank 0's
clock says the time budget is spent) are agreed in :func:`agree`, one small
all-reduce per step, and the policies below only see agreed facts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist


@dataclass
class StepFacts:
    """What all ranks agree on after a step."""

    nonfinite: bool    # some rank's loss or gradient norm was not finite (the update was skipped)
    out_of_time: bool  # rank 0's clock: train.max_minutes is spent


def agree(finite: bool | torch.Tensor, out_of_time: bool, rank: int, device: torch.device) -> StepFacts:
    """One MAX all-reduce of [not finite on this rank, out of time on rank 0], read once.

    ``finite`` may be a device tensor (an engine that keeps its figures on the
    device): the flags are then built on the device and the only host read is the
    result. On the training device: NCCL reduces GPU tensors only.
    """
    bad = torch.logical_not(torch.as_tensor(finite).to(device)).to(torch.int32).reshape(1)
    late = torch.tensor([1 if rank == 0 and out_of_time else 0], dtype=torch.int32, device=device)
    flags = torch.cat([bad, late])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, late_everywhere = flags.tolist()  # the step's one host read
    return StepFacts(nonfinite=bool(nonfinite), out_of_time=bool(late_everywhere))


@dataclass
class NonfiniteStreak:
    """Consecutive steps whose update was skipped for a non-finite loss or gradient."""

    limit: int  # train.max_nonfinite_steps
    streak: int = 0

    def update(self, nonfinite: bool) -> int:
        self.streak = self.streak + 1 if nonfinite else 0
        return self.streak

    @property
    def tripped(self) -> bool:
        return self.streak >= self.limit


@dataclass
class TimeBudget:
    """train.max_minutes, counted from the first step of this worker group (a restarted
    group gets the budget afresh; the benchmarks that use it run once)."""

    minutes: Optional[float]
    clock: Callable[[], float] = time.monotonic
    deadline: Optional[float] = field(default=None, init=False)

    def start(self) -> None:
        self.deadline = None if self.minutes is None else self.clock() + 60 * self.minutes

    def spent(self) -> bool:
        """This process's clock only: :func:`agree` makes rank 0's the one that counts."""
        return self.deadline is not None and self.clock() >= self.deadline


@dataclass
class PreemptionWatch:
    """Ask Ray every ``every`` steps whether a node of the run is being drained; one
    just-in-time checkpoint per notice. The question is a barrier of its own in Ray,
    so it is asked at the same steps on every rank, not every step."""

    every: int  # train.preemption_check_every
    noticed: bool = False

    def due(self, step: int) -> bool:
        return not self.noticed and step % self.every == 0


@dataclass
class CheckpointPolicy:
    """A checkpoint every ``every`` steps, at the last step (train.max_steps, or the
    last batch of train.max_epochs), and before any stop that is not a failure (time
    budget spent, preemption notice)."""

    every: int      # train.checkpoint_every
    max_steps: int  # train.max_steps

    def due(self, step: int, out_of_time: bool = False, preempted: bool = False, last: bool = False) -> bool:
        return step % self.every == 0 or step >= self.max_steps or out_of_time or preempted or last


@dataclass
class StopPolicy:
    """Why training stops after a step (None: it goes on). Early stopping (the
    evaluator's verdict) is asked only after a checkpoint, by the loop, since only a
    new checkpoint can change it."""

    max_steps: int
    max_minutes: Optional[float]

    def reason(self, step: int, facts: StepFacts, streak: NonfiniteStreak) -> Optional[str]:
        if streak.tripped:
            return "non-finite loss"
        if facts.out_of_time:
            return f"train.max_minutes={self.max_minutes:g} spent"
        if step >= self.max_steps:
            return f"train.max_steps={self.max_steps} reached"
        return None
