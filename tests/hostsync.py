"""Count the host reads of tensors (each one a host-device sync on a GPU) during a block.

On a GPU, ``Tensor.item``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()`` and
``.numpy()`` make the host wait for every kernel queued before them. This CPU-side
counter wraps those methods for the duration of a ``with`` block and records the
call site (file:line of the first frame outside torch) of each read, so a test can
hold a step to the reads it claims, on a machine without a GPU. On a GPU,
``torch.cuda.set_sync_debug_mode`` sees the syncs themselves (tests/gpu/).
"""

from __future__ import annotations

import collections
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
_TORCH_DIR = str(Path(torch.__file__).parent)


def _call_site() -> str:
    """'module:function' of the reader: torch's own file where torch reads (for example an
    optimizer's host-side step counter), else the first frame outside torch."""
    frame = sys._getframe(2)
    name = frame.f_code.co_filename
    if name.startswith(_TORCH_DIR):
        return f"torch/{Path(name).relative_to(_TORCH_DIR).as_posix()}:{frame.f_code.co_name}"
    return f"{Path(name).name}:{frame.f_code.co_name}"


@contextmanager
def count_host_reads() -> Iterator[collections.Counter]:
    """Yield a Counter of 'method file:function' -> reads, filled while the block runs."""
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    active = [False]  # a read inside a counted read (e.g. __format__ -> item) counts once

    def wrap(name: str, original):
        def counted(self, *args, **kwargs):
            if active[0]:
                return original(self, *args, **kwargs)
            counts[f"{name} {_call_site()}"] += 1
            active[0] = True
            try:
                return original(self, *args, **kwargs)
            finally:
                active[0] = False
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
