"""Length-bucketed, token-budget batch sampler, sharded by rank, deterministic and resumable.

One epoch's batches are a pure function of (lengths, seed, epoch, max_tokens,
pool_batches, max_sentences, shuffle), so every rank computes the same global
batch list independently (no communication) and takes its own slice of it:

1. shuffle all pair indices with ``np.random.default_rng((seed, epoch))``;
2. cut the shuffled order into pools of about ``pool_batches`` batches' worth of
   pairs and sort each pool by length: the paper's trick of sorting 20
   minibatches' worth of pairs, which keeps padding low while batches still
   differ from epoch to epoch (``pool_batches=0``: one pool, the whole epoch,
   i.e. plain bucketing by length with random order among equal lengths);
3. cut each sorted pool greedily into batches whose cost
   ``n_sentences * max(longest src + 1, longest tgt + 1)`` (the +1 is EOS/BOS)
   stays within ``max_tokens`` and, if given, at most ``max_sentences`` pairs (the
   paper's batches are 80 sentences);
4. shuffle the batch list, so lengths are mixed over the epoch;
   (``bucketing=False``, the naive baseline: step 2 is skipped, so batches are cut
   from the shuffled order as it is, at the same token budget, with no length sorting);
5. split the last ``len % num_replicas`` batches into ``num_replicas`` smaller
   ones, so every rank gets the same number of batches (which DDP needs to not
   hang) and no pair is left out; rank r takes batches r, r + W, r + 2W, ...

Resuming: ``state_dict()`` records how many batches each rank has yielded in the
current epoch; a new sampler given that state skips exactly those batches, and
the rest of the epoch is what an uninterrupted run would have seen.

Resuming with a different number of workers W' (a cluster that lost or gained
nodes): the global batch list does not depend on the world size, and after
``position`` batches per rank the first ``position * W`` global batches are done.
The new ranks share out the remaining global batches round-robin (again
splitting the last few so counts stay equal). Every pair of the epoch is still
trained on exactly once, for any sequence of world sizes (elastic training); from
the next epoch on, batches are exactly those of a run started with W' workers.

This sampler is the whole data-loading contract with Ray Train: the training loop
iterates it and collates batches itself, and must not pass a DataLoader through
``ray.train.torch.prepare_data_loader`` with ``add_dist_sampler=True`` (the
default), which would replace it with a DistributedSampler.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from distnmt.data.errors import DataError


class BucketBatchSampler:
    """Yields lists of pair indices; see the module docstring for the algorithm."""

    def __init__(
        self,
        src_lengths: np.ndarray,
        tgt_lengths: np.ndarray,
        max_tokens: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        pool_batches: int = 20,
        max_sentences: int | None = None,
        bucketing: bool = True,
    ) -> None:
        src = np.asarray(src_lengths)
        tgt = np.asarray(tgt_lengths)
        if src.ndim != 1 or src.shape != tgt.shape:
            raise ValueError(f"src_lengths {src.shape} and tgt_lengths {tgt.shape} must be 1-d and equal in length")
        if len(src) == 0:
            raise ValueError("no pairs to sample from")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in range for num_replicas {num_replicas}")
        if pool_batches < 0:
            raise ValueError(f"pool_batches must be >= 0 (0: the whole epoch), got {pool_batches}")
        if max_sentences is not None and max_sentences < 1:
            raise ValueError(f"max_sentences must be positive, got {max_sentences}")
        # int32: at tens of millions of pairs every byte per pair counts, in every worker.
        self._src_len = src.astype(np.int32) + 1  # + EOS on the source
        self._tgt_len = tgt.astype(np.int32) + 1  # + BOS (input) / EOS (output) on the target
        self._cost = np.maximum(self._src_len, self._tgt_len)
        too_long = np.flatnonzero(self._cost > max_tokens)
        if len(too_long):
            i = int(too_long[0])
            raise DataError(
                f"pair {i}: needs {int(self._cost[i])} tokens (src {int(src[i])}, tgt {int(tgt[i])}, +1 for EOS) "
                f"but max_tokens is {max_tokens}; {len(too_long)} pair(s) too long: raise data.max_tokens, or prepare "
                f"with a lower data.max_len (with train.batch_sentences, train with the data.max_len prepared)"
            )
        self.max_tokens = int(max_tokens)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.pool_batches = int(pool_batches)
        self.max_sentences = max_sentences
        self.bucketing = bool(bucketing)
        if self.pool_batches == 0 or not self.bucketing:  # unbucketed: one pool, never sorted
            self._pool_size = len(src)
        else:
            # A pool holds about pool_batches batches: estimate the batch size from the
            # mean cost (sorted batches are near-uniform, so mean cost is a fair guess).
            per_batch = max(1, int(self.max_tokens // float(self._cost.mean())))
            if max_sentences is not None:
                per_batch = min(per_batch, max_sentences)
            self._pool_size = self.pool_batches * per_batch
        self.epoch = 0
        self.position = 0  # batches this rank has handed out at this world size
        # Earlier world sizes in this epoch: [(replicas, steps each rank took)], oldest first.
        self.history: list[tuple[int, int]] = []
        self._cache: tuple[int, list[np.ndarray]] | None = None
        self._split_cache: tuple[Any, tuple[list[np.ndarray], list[np.ndarray]]] | None = None

    # ---- the epoch's batches -------------------------------------------------

    def _all_batches(self) -> list[np.ndarray]:
        """Every batch of the current epoch, in global order, before any is dropped; cached."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._build(self.epoch))
        return self._cache[1]

    def _split(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(kept, dropped) batches left for this world size; kept is a multiple of num_replicas.

        Replays the epoch's earlier world sizes (``history``): each took its share of
        what was left, and the rest passes on. Cached, as every rank asks often.
        """
        key = (self.epoch, tuple(self.history), self.num_replicas)
        if self._split_cache is None or self._split_cache[0] != key:
            rest = self._all_batches()
            for replicas, steps in self.history:
                kept, dropped = _divide(rest, replicas)
                if kept:  # else those ranks could take nothing: the rest passes on whole
                    # What they would have dropped at the epoch's end they never reached: it passes on.
                    rest = kept[steps * replicas:] + dropped
            kept, dropped = _divide(rest, self.num_replicas)
            if not kept and not self.history and rest:
                raise DataError(
                    f"only {sum(len(b) for b in rest)} pair(s) in {len(rest)} batch(es) of {self.max_tokens} tokens "
                    f"for {self.num_replicas} replicas; lower max_tokens or use fewer workers"
                )
            self._split_cache = (key, (kept, dropped))
        return self._split_cache[1]

    def _build(self, epoch: int) -> list[np.ndarray]:
        n = len(self._cost)
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        pool = np.arange(n) // self._pool_size
        if not self.bucketing:
            # The naive baseline: cut the shuffled order as it is (the greedy cut
            # needs no sorting: k * running max still only grows with k).
            batches = self._cut(order, self._cost[order], pool)
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            return batches
        # Sort inside each pool by cost (a batch's cost is its costliest pair), then
        # by source, then target length. Source second because English is the
        # shorter side here, so the source is what the cost order leaves ragged;
        # on real WMT lengths this beats target-second by about a point of padding
        # efficiency. The sort is stable, so full ties keep the shuffled order.
        within = self._sort_pools(order, pool)
        order = order[within]
        batches = self._cut(order, self._cost[order], pool)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _sort_pools(self, order: np.ndarray, pool: np.ndarray) -> np.ndarray:
        """Stable argsort of ``order`` by (pool, cost, src, tgt)."""
        cost = self._cost[order].astype(np.int64)
        src, tgt = self._src_len[order].astype(np.int64), self._tgt_len[order].astype(np.int64)
        span = int(self._cost.max()) + 1  # bounds cost, src and tgt alike
        if (int(pool[-1]) + 1) * span**3 < 2**62:
            # One packed int64 key sorts about 4x faster than a 4-key lexsort,
            # which matters at tens of millions of pairs per epoch.
            key = ((pool * span + cost) * span + src) * span + tgt
            return np.argsort(key, kind="stable")
        return np.lexsort((tgt, src, cost, pool))

    def _cut(self, order: np.ndarray, cost: np.ndarray, pool: np.ndarray) -> list[np.ndarray]:
        """Greedily cut the pool-sorted ``order`` into batches within the token budget.

        One numpy step per batch rather than a Python step per pair: a batch
        starting at ``s`` can hold at most ``max_tokens // cost[s]`` pairs, and the
        cost of its first k pairs, ``k * running_max``, only grows with k, so the
        largest k under the budget is a searchsorted.
        """
        n = len(order)
        pool_end = np.minimum((pool + 1) * self._pool_size, n)
        cap = self.max_sentences or n
        batches: list[np.ndarray] = []
        start = 0
        while start < n:
            limit = min(self.max_tokens // int(cost[start]), cap, int(pool_end[start]) - start)
            window = np.maximum.accumulate(cost[start:start + limit]).astype(np.int64)
            window *= np.arange(1, len(window) + 1)
            size = int(np.searchsorted(window, self.max_tokens, side="right"))
            batches.append(order[start:start + size])
            start += size
        return batches

    # ---- sampler protocol ---------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Switch to ``epoch``; the position restarts at 0 unless it is the current epoch.

        Keeping the position for the current epoch lets a training loop call
        ``set_epoch(e)`` right after ``load_state_dict`` without losing the resume point.
        """
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0
            self.history = []

    def _my_batches(self) -> list[np.ndarray]:
        kept, _ = self._split()
        return kept[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's remaining batches of this epoch, from the resume position on."""
        batches = self._my_batches()
        while self.position < len(batches):
            batch = batches[self.position]
            # Count the batch before handing it out: a state_dict taken while the
            # consumer holds it must not replay it after a restart.
            self.position += 1
            yield batch.tolist()

    def __len__(self) -> int:
        """This rank's number of batches in the current epoch (all ranks have the same)."""
        kept, _ = self._split()
        return len(kept) // self.num_replicas

    def dropped_batches(self) -> list[list[int]]:
        """The batches left out this epoch so ranks get equal counts (fewer than num_replicas)."""
        _, dropped = self._split()
        return [b.tolist() for b in dropped]

    def state_dict(self) -> dict[str, Any]:
        """Where this epoch stands; ``position`` counts batches handed out by ``__iter__``.

        A DataLoader with workers pulls batches ahead of the training step
        (prefetching), so a loop that checkpoints mid-epoch through one should store
        the number of batches it has *trained on* as ``position`` instead.
        """
        return {
            "epoch": self.epoch,
            "position": self.position,
            "history": [list(h) for h in self.history],
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "max_tokens": self.max_tokens,
            "pool_batches": self.pool_batches,
            "max_sentences": self.max_sentences,
            "shuffle": self.shuffle,
            "bucketing": self.bucketing,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after the last batch yielded when ``state`` was taken.

        The state is rank-independent (all ranks advance in lockstep), so rank 0's
        copy resumes every rank. It must come from a sampler that cuts the same
        batches (same seed, budget, pools, sentence cap); the number of replicas may
        differ (see the module docstring).
        """
        for key in ("seed", "max_tokens", "pool_batches", "max_sentences", "shuffle", "bucketing"):
            if key in state and state[key] != getattr(self, key):  # older states lack the last four
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this sampler has {key}={getattr(self, key)}; "
                    "its batches would differ from the ones already trained on, so it cannot resume exactly"
                )
        self.epoch = int(state["epoch"])
        position, replicas = int(state["position"]), int(state["num_replicas"])
        history = [(int(w), int(p)) for w, p in state.get("history", [])]
        if state.get("start"):  # a state from before `history`: one rank had done `start` batches
            history = [(1, int(state["start"])), *history]
        if replicas != self.num_replicas:
            # The old ranks' share of the epoch ends here; the new ones share out the rest.
            history, position = [*history, (replicas, position)], 0
        self.history, self.position = history, 0
        if not 0 <= position <= len(self):
            raise ValueError(f"sampler state position {position} is outside epoch {self.epoch}'s {len(self)} batches")
        self.position = position

    def padding_efficiency(self) -> float:
        """Real tokens / padded tokens (source and target tensors) over this epoch's kept batches.

        A group resumed exactly at the end of an epoch's share has no batches left in
        it (``len(self) == 0``): the figure is then the whole epoch's.
        """
        kept, _ = self._split()
        real = padded = 0
        for b in kept or self._all_batches():
            src, tgt = self._src_len[b], self._tgt_len[b]
            real += int(src.sum() + tgt.sum())
            padded += len(b) * int(src.max() + tgt.max())
        return real / padded if padded else float("nan")


def _divide(batches: list[np.ndarray], parts: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(kept, dropped): ``batches`` made a multiple of ``parts`` long, for round-robin ranks.

    The last ``len % parts`` batches would leave some ranks without a batch for the
    final step; they are cut into ``parts`` smaller batches instead (halving the
    largest: a batch is sorted by length, so each half keeps like with like, and
    half a batch never costs more tokens than the whole). When they hold fewer
    pairs than ``parts``, the round before them joins in, and so on. Only when even
    all of ``batches`` holds too few pairs is anything dropped: the last
    ``len % parts`` batches, fewer than ``parts`` pairs in all.
    """
    tail = len(batches) % parts
    if tail == 0:
        return list(batches), []
    cut = len(batches) - tail
    while cut >= 0:
        region = batches[cut:]
        want = len(region) + parts - tail  # the next multiple of parts
        if sum(len(b) for b in region) >= want:
            pieces = list(region)
            while len(pieces) < want:
                i = max(range(len(pieces)), key=lambda j: len(pieces[j]))  # first largest: deterministic
                half = (len(pieces[i]) + 1) // 2
                pieces[i:i + 1] = [pieces[i][:half], pieces[i][half:]]
            return list(batches[:cut]) + pieces, []
        cut -= parts
    # Too few pairs to split into whole rounds (single-pair batches, as unbucketed
    # random batches of long pairs can be): keep the whole rounds, drop the tail,
    # which then holds fewer than ``parts`` pairs.
    return list(batches[:len(batches) - tail]), list(batches[len(batches) - tail:])
