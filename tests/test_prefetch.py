"""The prefetcher hands out the sampler's groups in order, prepared while the
previous step trains, with the sampler position a checkpoint must store."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from distnmt.data.batch import Batch
from distnmt.data.sampler import BucketBatchSampler
from distnmt.train.prefetch import Prefetcher, step_groups

CPU = torch.device("cpu")


def _sampler() -> BucketBatchSampler:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=400)
    return BucketBatchSampler(lengths, lengths, 120, seed=3)


def _collate(indices: list[int]) -> Batch:
    n = torch.tensor(indices)
    ids = (n[:, None] % 7 + 3).expand(-1, 4).contiguous()
    return Batch(src=ids, src_lengths=torch.full((len(indices),), 4), tgt_in=ids, tgt_out=ids, indices=indices)


def test_groups_positions_and_exact_resume() -> None:
    serial = list(step_groups(_sampler(), 3))
    with Prefetcher(_sampler(), _collate, 3, CPU, depth=2) as prefetcher:
        got = list(prefetcher)
    assert [[b.indices for b in g.batches] for g in got] == serial
    assert [g.sampler_position for g in got] == [min(3 * (i + 1), len(_sampler())) for i in range(len(got))]
    assert all(b.target_tokens == b.tgt_out.numel() for g in got for b in g.batches)

    # Train 4 groups, checkpoint with the group's position (the thread is already ahead), resume.
    sampler = _sampler()
    with Prefetcher(sampler, _collate, 3, CPU, depth=2) as prefetcher:
        for i, group in enumerate(prefetcher):
            if i == 3:
                state = sampler.state_dict() | {"position": group.sampler_position}
                break
    assert sampler.position > state["position"]  # drawn ahead: its own position would skip batches
    resumed = _sampler()
    resumed.load_state_dict(state)
    assert list(step_groups(resumed, 3)) == serial[4:]


def test_next_group_is_prepared_while_the_current_one_trains() -> None:
    second_ready = threading.Event()
    calls = []

    def collate(indices: list[int]) -> Batch:
        calls.append(indices)
        if len(calls) == 2:
            second_ready.set()
        return _collate(indices)

    with Prefetcher(_sampler(), collate, 1, CPU, depth=1) as prefetcher:
        it = iter(prefetcher)
        next(it)
        # "Training" the first group: the second is collated meanwhile, unasked.
        assert second_ready.wait(timeout=10)


def test_errors_reach_the_training_thread_and_early_close_does_not_hang() -> None:
    def broken(indices: list[int]) -> Batch:
        raise ValueError("bad pair 7")

    with pytest.raises(ValueError, match="bad pair 7"):
        with Prefetcher(_sampler(), broken, 2, CPU) as prefetcher:
            list(prefetcher)
    prefetcher = Prefetcher(_sampler(), _collate, 1, CPU, depth=1)
    next(iter(prefetcher))
    prefetcher.close()  # the thread is blocked on a full queue: must still return
    assert not prefetcher._thread.is_alive()
    with pytest.raises(ValueError):
        Prefetcher(_sampler(), _collate, 1, CPU, depth=0)


def test_pinning_is_a_no_op_without_cuda() -> None:
    batch = _collate([1, 2])
    if torch.cuda.is_available():
        pytest.skip("CUDA present: pinning is real here (tests/gpu covers it)")
    assert batch.pin_memory() is batch
    moved = batch.to(CPU, non_blocking=True)
    assert moved.src_lengths is batch.src_lengths and torch.equal(moved.src, batch.src)
