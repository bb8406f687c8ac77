"""The stop and checkpoint policies, and the one per-step agreement between ranks
(real 2-process gloo groups: a rank that stopped alone would hang the others)."""

from __future__ import annotations

import json
from pathlib import Path

import torch.multiprocessing as mp

from distnmt.train.policies import CheckpointPolicy, NonfiniteStreak, PreemptionWatch, StepFacts, StopPolicy, TimeBudget


def _agree(rank: int, init_file: str, results: str) -> None:
    import torch
    import torch.distributed as dist

    from distnmt.train.policies import agree

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cpu = torch.device("cpu")
        facts = [
            # Rank 0's clock decides: past on rank 0 only -> both stop; past on rank 1 only -> neither.
            agree(True, rank == 0, rank, cpu),
            agree(True, rank == 1, rank, cpu),
            # One rank's non-finite loss (a bool, or a tensor from an engine that keeps it on the device).
            agree(rank != 1, False, rank, cpu),
            agree(torch.tensor(rank != 0), False, rank, cpu),
        ]
        Path(f"{results}.{rank}").write_text(json.dumps([[f.nonfinite, f.out_of_time] for f in facts]))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_time_budget_of_rank_0_and_on_any_non_finite_loss(tmp_path: Path) -> None:
    import distnmt.train.policies  # noqa: F401  (imported once here; the forked ranks inherit it)

    mp.start_processes(_agree, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True,
                       start_method="fork")
    want = [[False, True], [False, False], [True, False], [True, False]]
    assert [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)] == [want, want]


def test_nonfinite_streak_counts_consecutive_steps_only() -> None:
    streak = NonfiniteStreak(limit=3)
    assert [streak.update(x) for x in (True, True, False, True, True)] == [1, 2, 0, 1, 2] and not streak.tripped
    streak.update(True)
    assert streak.tripped


def test_checkpoint_policy() -> None:
    policy = CheckpointPolicy(every=5, max_steps=12)
    assert [s for s in range(1, 13) if policy.due(s)] == [5, 10, 12]
    assert policy.due(3, out_of_time=True) and policy.due(3, preempted=True) and policy.due(3, last=True)


def test_stop_policy_order() -> None:
    stop, streak = StopPolicy(max_steps=10, max_minutes=2.0), NonfiniteStreak(limit=1)
    assert stop.reason(3, StepFacts(False, False), streak) is None
    assert stop.reason(10, StepFacts(False, False), streak) == "train.max_steps=10 reached"
    assert stop.reason(10, StepFacts(False, True), streak) == "train.max_minutes=2 spent"
    streak.update(True)
    assert stop.reason(10, StepFacts(True, True), streak) == "non-finite loss"


def test_time_budget_counts_from_start() -> None:
    now = [100.0]
    budget = TimeBudget(0.5, clock=lambda: now[0])
    now[0] = 1000.0
    budget.start()  # not from construction: a slow start does not eat the budget
    now[0] = 1029.0
    assert not budget.spent()
    now[0] = 1030.0
    assert budget.spent()
    assert not TimeBudget(None).spent()


def test_preemption_is_asked_at_the_same_steps_until_noticed() -> None:
    watch = PreemptionWatch(every=4)
    assert [s for s in range(1, 13) if watch.due(s)] == [4, 8, 12]
    watch.noticed = True
    assert not watch.due(16)
