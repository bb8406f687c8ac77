"""Real multi-process training on Ray: a worker killed mid-epoch that Ray replaces with
nothing lost. Exact resume is tested in one process on the Trainer itself
(tests/test_trainer.py); DeepSpeed runs with real processes are in
test_elastic.py (ZeRO-1, through 2 -> 1 -> 2 workers) and test_reliability_ray.py
(ZeRO-2, bf16, resumed by reruns and through a worker kill)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from distnmt.data.sampler import BucketBatchSampler
from distnmt.data.shards import TokenArray

pytestmark = [pytest.mark.integration, pytest.mark.ray]


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())


def _rank_batches(prepared: Path, epoch: int, world: int, max_tokens: int, seed: int) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Each rank's batches of one epoch as the trainers' samplers cut them, and the dropped ones."""
    src, tgt = TokenArray(prepared / "train.en"), TokenArray(prepared / "train.fr")
    per_rank, dropped = [], []
    for rank in range(world):
        sampler = BucketBatchSampler(src.lengths, tgt.lengths, max_tokens, num_replicas=world, rank=rank, seed=seed)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
        dropped = sampler.dropped_batches()
    return per_rank, dropped


def test_killed_worker_is_replaced_and_every_pair_is_trained_once(
    tiny_config, prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distnmt.orchestrate import run_training

    marker = tmp_path / "killed"
    # Rank 1 is SIGKILLed as it starts step 19, while rank 0 waits in that step's all-reduce.
    monkeypatch.setenv("DISTNMT_FAULT_KILL", f"1:19:{marker}")
    cfg = tiny_config(tmp_path, "faulty", "train.max_steps=30", "train.checkpoint_every=10",
                      "train.max_failures=1", "train.log_batches=true", "eval.max_sentences=5",
                      "eval.test_at_end=false", "eval.figures=false")
    records = run_training(cfg)
    assert marker.exists(), "the fault was not injected"
    run_dir = tmp_path / "faulty"
    assert _checkpoints(run_dir) == ["checkpoint_00000010", "checkpoint_00000020", "checkpoint_00000030"]
    assert sorted(r.step for r in records) == [10, 20, 30]

    # What was trained, from the batch log ('step epoch ids...' per batch, both attempts).
    trained: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for rank in (0, 1):
        for line in (run_dir / f"batches/rank{rank}.log").read_text().splitlines():
            _step, epoch, *ids = map(int, line.split())
            trained[epoch].update(ids)

    # What should have been: every batch of steps 1-30 once, and those of steps 11-18
    # (after checkpoint 10, before the kill) twice: redone, never skipped.
    want: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    epochs = {e: _rank_batches(prepared, e, 2, cfg.data.max_tokens, cfg.train.seed) for e in range(3)}
    per_epoch = len(epochs[0][0][0])
    for step in range(1, 31):
        epoch, i = divmod(step - 1, per_epoch)
        times = 2 if 11 <= step <= 18 else 1
        for rank in (0, 1):
            want[epoch].update({pair: times for pair in epochs[epoch][0][rank][i]})
    assert trained == want

    # Epoch 0 ran to its end: every pair of the corpus was in it, apart from the
    # fewer-than-world batches dropped so ranks have equal counts.
    n_pairs = len(TokenArray(prepared / "train.en"))
    dropped = {pair for batch in epochs[0][1] for pair in batch}
    assert set(trained[0]) == set(range(n_pairs)) - dropped
