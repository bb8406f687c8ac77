"""What a local `distnmt train` looks like from outside, read from /proc while it runs
(issue 18): the listening sockets of its process tree, what each Ray process of the run
was told (its cluster's address, the run's Ray Train settings), the tree's memory.

A helper of tests/integration/test_job_submit.py (not a test module): the run it
watches is the local one started beside a submitted job, so that one Ray run covers
both (each Ray run costs the suite tens of seconds of start-up)."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path
from typing import Optional

from distnmt.cluster import listening_sockets, process_tree, tree_memory

# The node's own agents, which the raylet starts before any job exists: not workers of the run.
NODE_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def environ(pid: int) -> dict[str, str]:
    """A process's environment, or {} once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def cmdline(pid: int) -> str:
    """A process's command line, or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclasses.dataclass
class Watched:
    """What was seen of a run's process tree while it ran."""

    sockets: set[tuple[int, str, int]] = dataclasses.field(default_factory=set)  # (pid, address, port)
    names: dict[int, str] = dataclasses.field(default_factory=dict)              # pid -> latest command line
    addresses: dict[int, str] = dataclasses.field(default_factory=dict)          # Ray worker pid -> RAY_ADDRESS
    start_timeouts: dict[int, str] = dataclasses.field(default_factory=dict)     # ... -> RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    peak_pss_mib: float = 0.0


def watch(proc: subprocess.Popen, interval_s: float = 1.0, timeout_s: Optional[float] = None) -> Watched:
    """Look at ``proc``'s process tree every ``interval_s`` until it exits (killed after
    ``timeout_s``)."""
    seen = Watched()
    polls, deadline = 0, None if timeout_s is None else time.time() + timeout_s
    while proc.poll() is None:
        if deadline is not None and time.time() > deadline:
            proc.kill()
            break
        tree = process_tree(proc.pid)
        for pid, address, port in listening_sockets(tree):
            seen.sockets.add((pid, address, port))
            # The latest command line: a Ray worker starts as ray::IDLE and is renamed
            # when it becomes an actor (a training worker, the evaluator).
            seen.names[pid] = cmdline(pid)[:80] or seen.names.get(pid, "")
        for pid in tree:
            command = cmdline(pid)
            # A Ray worker: an actor or a task of the run, not one of the node's agents.
            if command.startswith("ray::") and not command.startswith(NODE_AGENTS):
                env = environ(pid)
                seen.addresses[pid] = env.get("RAY_ADDRESS", "")
                seen.start_timeouts[pid] = env.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "")
                seen.names.setdefault(pid, command[:80])
        # Reading every process's smaps costs the kernel real time: every 4th look.
        if polls % 4 == 0:
            seen.peak_pss_mib = max(seen.peak_pss_mib, tree_memory(tree)["pss"])
        polls += 1
        time.sleep(interval_s)
    proc.wait()
    return seen
