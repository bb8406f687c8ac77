"""Fault injection for the reliability tests: real signals and real NaNs, set by variables.

DISTNMT_FAULT_KILL="RANK:STEP:MARKER" SIGKILLs rank RANK as it starts step STEP
(its peers are then blocked in the step's collectives), once: the marker file
keeps the restarted worker alive.

DISTNMT_FAULT_NAN="4,9-" makes the loss of step 4 and of every step from 9 on NaN,
on every rank; the NaN then goes through the real backward, clipping and update.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Callable


def maybe_kill(step: int, rank: int, say: Callable[[str], None]) -> None:
    """SIGKILL this process before ``step`` if DISTNMT_FAULT_KILL says so."""
    spec = os.environ.get("DISTNMT_FAULT_KILL")
    if not spec:
        return
    fault_rank, fault_step, marker = spec.split(":", 2)
    if rank == int(fault_rank) and step == int(fault_step) and not Path(marker).exists():
        Path(marker).write_text(f"rank {rank} killed at step {step}\n")
        say(f"[train] fault injection: SIGKILL rank {rank} at step {step}")
        os.kill(os.getpid(), signal.SIGKILL)


def nan_injected(step: int) -> bool:
    """Whether DISTNMT_FAULT_NAN poisons the loss of ``step``."""
    spec = os.environ.get("DISTNMT_FAULT_NAN", "")
    for part in filter(None, spec.split(",")):
        first, dash, last = part.partition("-")
        if int(first) <= step and (step <= int(last) if last else bool(dash) or step == int(first)):
            return True
    return False
