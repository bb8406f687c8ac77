"""The bucketed batch sampler on real WMT'14 lengths and on generated cases: every pair
exactly once per epoch, the same batch count on every rank, determinism, and resuming
(also with another number of workers) equal to an uninterrupted run."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distnmt.data import BucketBatchSampler, DataError, read_parallel

REPO = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def word_lengths(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Real (src, tgt) word counts of the training sample, up to 50 words as in the paper."""
    pairs = read_parallel(shared_data / "train/train.en.gz", shared_data / "train/train.fr.gz")
    lengths = np.array([(len(en.split()), len(fr.split())) for en, fr in pairs])
    lengths = lengths[(lengths.max(axis=1) <= 50) & (lengths.min(axis=1) > 0)]
    return lengths[:, 0], lengths[:, 1]


def _epoch(sampler: BucketBatchSampler) -> list[list[int]]:
    return list(sampler)


def _samplers(src, tgt, world: int, **kw) -> list[BucketBatchSampler]:
    return [BucketBatchSampler(src, tgt, num_replicas=world, rank=r, **kw) for r in range(world)]


def _cost(src, tgt, batch) -> int:
    return len(batch) * int(max(src[batch].max(), tgt[batch].max()) + 1)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_sampler_covers_every_pair_once(word_lengths, world: int) -> None:
    src, tgt = word_lengths
    samplers = _samplers(src, tgt, world, max_tokens=2048, seed=3)
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        per_rank = [_epoch(s) for s in samplers]
        counts = {len(b) for b in per_rank}
        assert counts == {len(samplers[0])}  # the same number of batches on every rank
        dropped = samplers[0].dropped_batches()
        assert len(dropped) < world
        seen = [i for batches in per_rank for b in batches for i in b]
        all_seen = seen + [i for b in dropped for i in b]
        assert len(all_seen) == len(set(all_seen)) == len(src)
        for batches in per_rank:
            assert all(_cost(src, tgt, b) <= 2048 for b in batches)


def test_sampler_small_cases_exhaustive() -> None:
    rng = np.random.default_rng(0)
    skipped = 0
    for trial in range(200):
        n = int(rng.integers(1, 60))
        src, tgt = rng.integers(0, 12, size=n), rng.integers(0, 12, size=n)
        max_tokens = int(rng.integers(13, 80))
        world = int(rng.integers(1, 4))
        kw = dict(max_tokens=max_tokens, seed=trial, pool_batches=int(rng.integers(1, 5)),
                  max_sentences=[None, 3][trial % 2], shuffle=bool(trial % 3))
        try:
            samplers = _samplers(src, tgt, world, **kw)
            per_rank = [_epoch(s) for s in samplers]
        except DataError as exc:  # fewer batches than replicas: must say so
            assert "replicas" in str(exc)
            skipped += 1
            continue
        flat = [i for batches in per_rank for b in batches for i in b]
        flat += [i for b in samplers[0].dropped_batches() for i in b]
        assert sorted(flat) == list(range(n))
        assert len({len(b) for b in per_rank}) == 1
        for b in itertools.chain.from_iterable(per_rank):
            assert b and _cost(src, tgt, b) <= max_tokens
            assert kw["max_sentences"] is None or len(b) <= kw["max_sentences"]
    assert skipped < 20


def test_sampler_is_deterministic(word_lengths) -> None:
    src, tgt = word_lengths
    a = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=7)
    b = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=7)
    assert _epoch(a) == _epoch(b)
    a.set_epoch(1)
    b.set_epoch(1)
    first = _epoch(a)
    assert first == _epoch(b)
    a.set_epoch(0)
    assert _epoch(a) != first  # batches differ from epoch to epoch
    c = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=8)
    c.set_epoch(1)
    assert _epoch(c) != first


def test_sampler_resumes_exactly(word_lengths) -> None:
    src, tgt = word_lengths
    full = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=5)
    full.set_epoch(2)
    expected = _epoch(full)
    assert full.state_dict()["position"] == len(full) == len(expected)

    run = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=5)
    run.set_epoch(2)
    it = iter(run)
    head = [next(it) for _ in range(10)]
    state = run.state_dict()
    assert state == {"epoch": 2, "position": 10, "history": [], "seed": 5, "num_replicas": 2, "max_tokens": 4096,
                     "pool_batches": 20, "max_sentences": None, "shuffle": True, "bucketing": True}

    # a fresh process: same config, state from rank 0's checkpoint (states are rank-independent)
    resumed = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    resumed.set_epoch(2)  # what a training loop does at the top of the epoch: must keep the position
    assert head + list(resumed) == expected
    resumed.set_epoch(3)
    assert resumed.state_dict()["position"] == 0 and len(list(resumed)) == len(resumed)

    for key, value in (("seed", 6), ("max_tokens", 2048), ("pool_batches", 5), ("max_sentences", 80),
                       ("bucketing", False)):
        other = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=5)
        with pytest.raises(ValueError, match=key):
            other.load_state_dict({**state, key: value})
    # a checkpoint from before these keys existed still resumes
    old = {k: state[k] for k in ("epoch", "position", "seed", "num_replicas", "max_tokens")}
    again = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=5)
    again.load_state_dict(old)
    assert head + list(again) == expected


def test_sampler_rejects_pair_over_budget() -> None:
    src, tgt = np.array([3, 4, 30, 2]), np.array([3, 40, 5, 2])
    with pytest.raises(DataError, match=r"^pair 1: needs 41 tokens .* max_tokens is 32"):
        BucketBatchSampler(src, tgt, max_tokens=32)


def test_sampler_padding_efficiency(word_lengths) -> None:
    src, tgt = word_lengths
    default = BucketBatchSampler(src, tgt, max_tokens=4096)
    wide = BucketBatchSampler(src, tgt, max_tokens=4096, pool_batches=100)
    # Random batching: the same greedy token budget over the shuffled order, unsorted.
    order = np.random.default_rng(0).permutation(len(src))
    real = padded = 0
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and _cost(src, tgt, order[start:end + 1]) <= 4096:
            end += 1
        b = order[start:end]
        real += int((src[b] + 1).sum() + (tgt[b] + 1).sum())
        padded += len(b) * int(src[b].max() + tgt[b].max() + 2)
        start = end
    random_eff = real / padded
    assert random_eff < 0.6
    assert default.padding_efficiency() > 0.85
    assert wide.padding_efficiency() >= 0.9


def test_unbucketed_baseline_is_the_greedy_cut_of_the_shuffled_order(word_lengths) -> None:
    """bucketing=False (the naive baseline of `distnmt bench peer`): batches are the shuffled
    order cut greedily under the budget, unsorted, so padding is that of random batching."""
    src, tgt = word_lengths
    naive = BucketBatchSampler(src, tgt, max_tokens=4096, seed=2, shuffle=False, bucketing=False)
    batches = _epoch(naive)
    assert [i for b in batches for i in b] == list(range(len(src)))  # unshuffled: the corpus order, uncut
    for b, after in zip(batches, batches[1:]):
        assert _cost(src, tgt, b) <= 4096 < _cost(src, tgt, b + after[:1])  # greedy: the next pair would not fit
    shuffled = BucketBatchSampler(src, tgt, max_tokens=4096, seed=2, bucketing=False)
    assert shuffled.padding_efficiency() < 0.6 < BucketBatchSampler(src, tgt, max_tokens=4096).padding_efficiency()


def test_whole_epoch_bucketing_and_sentence_cap(word_lengths) -> None:
    src, tgt = word_lengths
    bucketed = BucketBatchSampler(src, tgt, max_tokens=4096, pool_batches=0)
    assert bucketed.padding_efficiency() > BucketBatchSampler(src, tgt, max_tokens=4096).padding_efficiency()
    capped = BucketBatchSampler(src, tgt, max_tokens=4096, max_sentences=80)
    batches = _epoch(capped)
    assert max(len(b) for b in batches) == 80
    assert sorted(i for b in batches + capped.dropped_batches() for i in b) == list(range(len(src)))


def test_resume_with_another_world_size(word_lengths) -> None:
    src, tgt = word_lengths
    kw = dict(max_tokens=2048, seed=11)
    before = _samplers(src, tgt, 4, **kw)
    for s in before:
        s.set_epoch(1)
    iters = [iter(s) for s in before]
    seen = [i for _ in range(7) for it in iters for i in next(it)]  # 7 steps in lockstep on 4 ranks
    state = json.loads(json.dumps(before[0].state_dict()))
    assert state["position"] == 7

    after = _samplers(src, tgt, 3, **kw)  # one node lost
    for s in after:
        s.load_state_dict(state)
        s.set_epoch(1)
    assert after[0].state_dict()["history"] == [[4, 7]] and after[0].position == 0
    per_rank = [_epoch(s) for s in after]
    assert len({len(b) for b in per_rank}) == 1  # still equal counts per rank
    rest = [i for batches in per_rank for b in batches for i in b]
    dropped = [i for b in after[0].dropped_batches() for i in b]
    assert after[0].dropped_batches() == []  # the last batches are split, not dropped
    everything = seen + rest + dropped
    assert len(everything) == len(set(everything)) == len(src)  # every pair once in the epoch
    # the global batch list is the same: the new ranks continue where the old ones stopped
    full = BucketBatchSampler(src, tgt, num_replicas=1, **kw)
    full.set_epoch(1)
    global_rest = _epoch(full)[28:]
    new_batches = [b for step in zip(*per_rank) for b in step]  # global order: step by step, rank by rank
    # The last few batches are split (for 4 ranks, then again for 3); all before are the same.
    whole = len(new_batches) - 8
    assert whole > 300 and new_batches[:whole] == global_rest[:whole]
    assert sorted(i for b in new_batches[whole:] for i in b) == sorted(i for b in global_rest[whole:] for i in b)
    # next epoch: exactly what a fresh 3-worker run sees
    fresh = _samplers(src, tgt, 3, **kw)
    for a, b in zip(after, fresh):
        a.set_epoch(2)
        b.set_epoch(2)
        assert _epoch(a) == _epoch(b)


# ------------------------------------------------------------------- properties

_lengths = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=120)


@settings(max_examples=150, deadline=None)
@given(pairs=_lengths, max_tokens=st.integers(41, 400), world=st.integers(1, 5), seed=st.integers(0, 3),
       pool=st.integers(0, 6), cap=st.none() | st.integers(1, 12), shuffle=st.booleans(), epoch=st.integers(0, 2),
       bucketing=st.booleans())
def test_property_once_per_epoch_equal_counts_deterministic(pairs, max_tokens, world, seed, pool, cap, shuffle, epoch,
                                                            bucketing) -> None:
    src, tgt = np.array(pairs).T
    kw = dict(max_tokens=max_tokens, seed=seed, pool_batches=pool, max_sentences=cap, shuffle=shuffle,
              bucketing=bucketing)
    samplers = _samplers(src, tgt, world, **kw)
    for s in samplers:
        s.set_epoch(epoch)
    try:
        per_rank = [_epoch(s) for s in samplers]
    except DataError as exc:  # fewer batches than replicas: must say so
        assert "replicas" in str(exc)
        return
    assert len({len(b) for b in per_rank}) == 1
    assert len(samplers[0].dropped_batches()) < world
    flat = [i for batches in per_rank for b in batches for i in b] + [i for b in samplers[0].dropped_batches() for i in b]
    assert sorted(flat) == list(range(len(src)))
    for b in itertools.chain.from_iterable(per_rank):
        assert b and len(b) * int(max(src[b].max(), tgt[b].max()) + 1) <= max_tokens
        assert cap is None or len(b) <= cap
    again = _samplers(src, tgt, world, **kw)
    for s in again:
        s.set_epoch(epoch)
    assert [_epoch(s) for s in again] == per_rank


@settings(max_examples=150, deadline=None)
@given(pairs=_lengths, max_tokens=st.integers(41, 300), world=st.integers(1, 4), new_world=st.integers(1, 4),
       stop=st.integers(0, 30), seed=st.integers(0, 3), bucketing=st.booleans())
def test_property_resume_equals_uninterrupted(pairs, max_tokens, world, new_world, stop, seed, bucketing) -> None:
    src, tgt = np.array(pairs).T
    kw = dict(max_tokens=max_tokens, seed=seed, pool_batches=2, bucketing=bucketing)
    try:
        uninterrupted = [_epoch(s) for s in _samplers(src, tgt, world, **kw)]
    except DataError:
        return
    steps = min(stop, len(uninterrupted[0]))
    run = _samplers(src, tgt, world, **kw)
    its = [iter(s) for s in run]
    head = [[next(it) for _ in range(steps)] for it in its]
    state = json.loads(json.dumps(run[0].state_dict()))
    # the same world size: the rest of the epoch is exactly the uninterrupted one
    resumed = _samplers(src, tgt, world, **kw)
    for s in resumed:
        s.load_state_dict(state)
    assert [h + _epoch(s) for h, s in zip(head, resumed)] == uninterrupted
    # another world size: no pair twice, equal counts, at most new_world - 1 batches left out
    other = _samplers(src, tgt, new_world, **kw)
    try:
        for s in other:
            s.load_state_dict(state)
        rest = [_epoch(s) for s in other]
    except DataError as exc:  # nothing done yet and fewer batches than the new replicas
        assert state["position"] == 0 and "replicas" in str(exc)
        return
    assert len({len(r) for r in rest}) == 1
    seen = [i for h in head for b in h for i in b] + [i for r in rest for b in r for i in b]
    assert len(seen) == len(set(seen))
    missing = set(range(len(src))) - set(seen)
    assert missing == {i for b in other[0].dropped_batches() for i in b}
    assert len(other[0].dropped_batches()) < new_world


_segments = st.lists(st.tuples(st.integers(1, 4), st.integers(0, 12), st.integers(0, 12)), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(pairs=_lengths, max_tokens=st.integers(41, 300), segments=_segments, seed=st.integers(0, 3),
       pool=st.integers(0, 4), bucketing=st.booleans())
def test_property_elastic_world_sizes_train_every_pair_once(pairs, max_tokens, segments, seed, pool, bucketing) -> None:
    """Elastic training, simulated: each segment runs at some world size, takes a checkpoint
    after ``keep`` steps, runs ``lost`` more steps and dies (those batches are redone); the
    last world size finishes the epoch. Every pair is trained on, and a pair is trained
    twice only if it was in a lost (redone) batch; every batch stays within the budget."""
    src, tgt = np.array(pairs).T
    kw = dict(max_tokens=max_tokens, seed=seed, pool_batches=pool, bucketing=bucketing)
    state = None
    trained: list[int] = []
    lost: set[int] = set()
    dropped: list[list[int]] = []
    try:
        for world, keep, extra in segments:
            run = _samplers(src, tgt, world, **kw)
            for s in run:
                if state is not None:
                    s.load_state_dict(state)
            assert len({len(s) for s in run}) == 1  # equal counts: DDP does not hang
            its = [iter(s) for s in run]
            done = min(keep, len(run[0]) - run[0].position)
            for _ in range(done):
                trained += [i for it in its for i in next(it)]
            state = json.loads(json.dumps(run[0].state_dict()))
            for _ in range(min(extra, len(run[0]) - run[0].position)):  # trained, then lost with the worker
                batch = [i for it in its for i in next(it)]
                trained += batch
                lost |= set(batch)
        final = _samplers(src, tgt, segments[-1][0], **kw)
        for s in final:
            s.load_state_dict(state)
    except DataError as exc:  # fewer pairs than ranks at the very start: the clear error
        assert state is None and "replicas" in str(exc)
        return
    for s in final:
        for batch in s:
            assert _cost(src, tgt, np.array(batch)) <= max_tokens
            trained += batch
    # Nothing is dropped unless what is left of the epoch holds too few pairs to give
    # every rank one for the last step (tiny data only: never with real batch sizes).
    for s in (final[0],):
        left = s.dropped_batches()
        assert not left or sum(map(len, left)) < len(left) + s.num_replicas
        dropped += left
    trained += [i for b in dropped for i in b]
    assert set(trained) == set(range(len(src)))
    counts = np.bincount(trained, minlength=len(src))
    twice = {i for i in range(len(src)) if counts[i] > 1}
    assert twice <= lost and counts.max() <= 1 + len(segments)


def test_training_loop_does_not_let_ray_replace_the_sampler() -> None:
    """Ray's prepare_data_loader (add_dist_sampler=True by default) swaps in a
    DistributedSampler; the loop must iterate this sampler itself instead."""
    for path in (REPO / "distnmt/train").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        if "prepare_data_loader(" in text:
            assert "add_dist_sampler=False" in text, f"{path}: prepare_data_loader would replace BucketBatchSampler"
    assert "BucketBatchSampler(" in (REPO / "distnmt/train/trainer.py").read_text(encoding="utf-8")


def test_resumed_at_the_end_of_an_epoch_share_on_fewer_ranks(word_lengths) -> None:
    """A checkpoint taken as 2 ranks finished their share of the epoch, resumed on 1:
    nothing is left of that epoch (0 batches), and the sampler still reports its figures
    (the elastic run once died here dividing by zero) and moves on to the next epoch."""
    src, tgt = word_lengths
    two = BucketBatchSampler(src, tgt, 2048, num_replicas=2, rank=0, seed=3)
    two.set_epoch(0)
    done = len(two)
    for _ in two:
        pass
    state = two.state_dict()
    assert state["position"] == done
    one = BucketBatchSampler(src, tgt, 2048, num_replicas=1, rank=0, seed=3)
    one.load_state_dict(state)
    assert len(one) == 0 and list(one) == []
    assert 0.5 < one.padding_efficiency() <= 1.0  # the whole epoch's figure
    one.set_epoch(1)
    assert len(one) > 0 and 0.5 < one.padding_efficiency() <= 1.0
