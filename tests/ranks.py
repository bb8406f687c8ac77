"""The ranks of a test's own torch.distributed group (gloo on CPU), one process each.

Each rank is a fresh process, as under Ray or torchrun, but forked from one
forkserver per pytest process that has already imported torch, DeepSpeed and
distnmt's engine. The 'spawn' start method made every rank import them again:
about 6.5 CPU-seconds a rank, 72 over the suite's 11 ranks on a 2-core machine
that the suite keeps busy (docs/BENCHMARKS.md, the suite's time). The forkserver is
started the first time a test needs it and ends with the pytest process.

A rank starts from the forkserver's state, not the test's: a rank sets its own
environment (MASTER_ADDR, RANK...) and reads its inputs from its arguments.
"""

from __future__ import annotations

import multiprocessing
import socket
from typing import Any, Callable

import torch.multiprocessing as mp

# Imported once by the forkserver; every rank forked from it has them. (deepspeed:
# what distnmt.train.engine.import_deepspeed imports; a failed preload is only slower.)
PRELOAD = ["torch", "torch.distributed", "deepspeed", "deepspeed.ops", "distnmt.train.engine",
           "distnmt.train.reshard"]


def free_port() -> int:
    """A free TCP port on loopback, for the group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes; returns when all have ended, and
    raises (with the rank's traceback) if one failed, as ``torch.multiprocessing.spawn``."""
    # Read when the forkserver starts, so it must be set before the first rank of the session.
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")
