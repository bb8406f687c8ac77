"""The next step's batches, prepared while the current step trains.

A background thread draws the sampler's next group of ``accumulate`` batches,
collates it (numpy padding) and pins it in page-locked memory; the training thread
takes it from a small queue and issues the copies to the device with
``non_blocking=True``, so they are queued behind the current step's kernels
instead of waiting for them. On a CPU-only machine pinning is skipped
(``Batch.pin_memory`` is then the batch itself) and the copies are no-ops.

The sampler is consumed ahead of training: ``sampler.position`` runs up to
``depth`` groups ahead of the step being trained. Each group therefore carries the
position the sampler had just after drawing it; a checkpoint taken after training
that group stores that position (``StepGroup.sampler_position``), so a restart
replays nothing and skips nothing.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from distnmt.data.batch import Batch

_DONE = object()


@dataclass
class StepGroup:
    """One optimizer step's micro-batches, on the device."""

    batches: list[Batch]
    sampler_position: int  # the sampler's position once this group was drawn


def step_groups(sampler: Iterable[list[int]], accumulate: int) -> Iterator[list[list[int]]]:
    """The sampler's batches ``accumulate`` at a time (a short group at the epoch's end)."""
    group: list[list[int]] = []
    for indices in sampler:
        group.append(indices)
        if len(group) == accumulate:
            yield group
            group = []
    if group:
        yield group


class Prefetcher:
    """Iterate over StepGroups, preparing up to ``depth`` groups ahead in a thread.

    ``collate(indices) -> Batch`` builds a host batch; ``sampler`` is iterated in the
    thread and must have a ``position`` attribute (BucketBatchSampler). Use as a
    context manager, or call ``close()``: a loop that stops early (time budget,
    early stop) leaves the thread blocked on a full queue otherwise.
    """

    def __init__(self, sampler: Any, collate: Callable[[list[int]], Batch], accumulate: int,
                 device: torch.device, depth: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.device = device
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(sampler, collate, accumulate), name="distnmt-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Queue ``item`` unless asked to stop; False when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, sampler: Any, collate: Callable[[list[int]], Batch], accumulate: int) -> None:
        try:
            for group in step_groups(sampler, accumulate):
                host = [collate(indices).pin_memory() for indices in group]
                if not self._put((host, int(sampler.position))):
                    return
        except BaseException as err:  # handed to the training thread, raised there
            self._put(err)
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[StepGroup]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            host, position = item
            yield StepGroup([b.to(self.device, non_blocking=True) for b in host], position)

    def close(self) -> None:
        """Stop the thread (it may have drawn groups that will not be trained)."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
