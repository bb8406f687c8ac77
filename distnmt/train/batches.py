"""This rank's optimizer steps' worth of batches, epoch after epoch, one step ahead.

The loop asks for the next step's batches right after it has handed the current
step to the engine and before it reads anything back, so the collation (numpy)
and the host-to-device copies of step k+1 happen while the device still works on
step k. On CUDA the batches go through pinned memory with non-blocking copies,
which is what lets a copy overlap with compute.

Because the next group is drawn before the current one is trained, the sampler's
live position is one group ahead of training; each group therefore carries the
sampler state *after itself*, and a checkpoint stores that one: a resumed run
starts exactly after the last trained group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from distnmt.data.batch import Batch, collate
from distnmt.data.sampler import BucketBatchSampler
from distnmt.data.shards import TokenArray


@dataclass
class StepGroup:
    """The micro-batches of one optimizer step, on the training device."""

    epoch: int
    batches: list[Batch]
    sampler_state: dict[str, Any]  # the sampler once this group is trained: what a checkpoint saves


def step_groups(sampler: BucketBatchSampler, accumulate: int, first_epoch: int,
                max_epochs: int) -> Iterator[tuple[int, list[list[int]], dict[str, Any]]]:
    """(epoch, ``accumulate`` batches' indices, sampler state after them), to max_epochs.

    The first epoch continues from the sampler's position (a resumed run); a short
    group ends an epoch whose batches do not divide by ``accumulate``.
    """
    for epoch in range(first_epoch, max_epochs):
        sampler.set_epoch(epoch)  # keeps the position when it is the sampler's current epoch
        group: list[list[int]] = []
        for indices in sampler:
            group.append(indices)
            if len(group) == accumulate:
                yield epoch, group, sampler.state_dict()
                group = []
        if group:
            yield epoch, group, sampler.state_dict()


class Prefetcher:
    """Collates and moves the next step's batches when asked, from :func:`step_groups`."""

    def __init__(self, groups: Iterator[tuple[int, list[list[int]], dict[str, Any]]], src: TokenArray,
                 tgt: TokenArray, device: torch.device) -> None:
        self._groups = groups
        self._src, self._tgt = src, tgt
        self._device = device
        self._pin = device.type == "cuda"

    def next(self) -> Optional[StepGroup]:
        """The next step's batches on the device (copies possibly still in flight), or None at the end."""
        item = next(self._groups, None)
        if item is None:
            return None
        epoch, group, sampler_state = item
        batches = []
        for indices in group:
            batch = collate(self._src, self._tgt, indices)
            if self._pin:
                batch = batch.pin_memory()
            batches.append(batch.to(self._device, non_blocking=self._pin))
        return StepGroup(epoch, batches, sampler_state)
