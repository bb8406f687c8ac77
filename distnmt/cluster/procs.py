"""Process trees seen from /proc: their memory (PSS, USS), their listening sockets, and a
local cluster's processes, found by a marker in their environment and stopped by
process id (never ``ray stop``, which stops every Ray cluster of the machine)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Iterable


MARKER_VAR = "DISTNMT_RAY_CLUSTER"


def _read(path: Path) -> bytes:
    """A /proc file's bytes, or b'' when the process is gone or not ours."""
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _ppid(pid: int) -> int:
    """Parent pid from /proc/<pid>/stat (0 if gone); field 4, after the ')' of the name."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    try:
        return int(stat.rsplit(b")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return 0


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            children.setdefault(_ppid(int(entry.name)), []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a local Ray cluster's daemons and workers
    descend from the driver that started it)."""
    children, found, i = _children(), [pid], 0
    while i < len(found):
        found += children.get(found[i], [])
        i += 1
    return found


def tree_memory(pids: Iterable[int]) -> dict[str, float]:
    """Memory of a set of processes in MiB, from /proc/<pid>/smaps_rollup.

    rss: summed resident sets (counts a page shared by N processes N times, e.g.
    torch's libraries in every worker); pss: proportional set size (a shared page
    counted 1/N in each), whose sum is what the processes together cost; uss:
    private pages only (what killing them would free). ``largest_rss``: the biggest
    single process. Processes gone meanwhile, or not ours, count nothing.
    """
    totals = {"rss": 0.0, "pss": 0.0, "uss": 0.0, "largest_rss": 0.0, "processes": 0.0}
    for pid in pids:
        text = _read(Path(f"/proc/{pid}/smaps_rollup")).decode(errors="replace")
        fields: dict[str, int] = {}
        for line in text.splitlines()[1:]:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[name] = int(parts[0])  # kB
        if "Rss" not in fields:
            continue
        rss = fields["Rss"] / 1024
        totals["rss"] += rss
        totals["pss"] += fields.get("Pss", 0) / 1024
        totals["uss"] += (fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) / 1024
        totals["largest_rss"] = max(totals["largest_rss"], rss)
        totals["processes"] += 1
    return totals


def listening_sockets(pids: Iterable[int]) -> list[tuple[int, str, int]]:
    """(pid, local address, port) of every listening TCP socket (IPv4 and IPv6) the
    processes hold, from /proc/<pid>/net/tcp{,6} and their open file descriptors."""
    wanted = set(pids)
    inodes: dict[str, int] = {}
    for pid in wanted:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            entries = list(fd_dir.iterdir())
        except OSError:
            continue
        for fd in entries:
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
    found: set[tuple[int, str, int]] = set()  # each process's table lists its namespace's every socket
    parsed: set[bytes] = set()
    for pid in wanted:
        for name in ("tcp", "tcp6"):
            table = _read(Path(f"/proc/{pid}/net/{name}"))
            if not table or table in parsed:
                continue
            parsed.add(table)
            for row in table.decode().splitlines()[1:]:
                cols = row.split()
                if len(cols) < 10 or cols[3] != "0A":  # 0A: LISTEN
                    continue
                owner = inodes.get(cols[9])
                if owner is None:
                    continue
                address, port = cols[1].split(":")
                found.add((owner, _decode_address(address), int(port, 16)))
    return sorted(found)


def _decode_address(hex_address: str) -> str:
    """/proc/net/tcp's little-endian hex address as text (IPv4 or IPv6)."""
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "::ffff:127.0.0.1") or address.startswith("::ffff:127.")


# ---------------------------------------------------------------- a local cluster's processes


def _own_lineage() -> set[int]:
    """This process and its ancestors: never signalled, even if they carry the marker."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        pid = _ppid(pid)
    return pids


def cluster_pids(marker: str, temp_dir: str) -> list[int]:
    """Pids of one local Ray cluster: processes whose environment holds the marker or
    whose command line names the cluster's temp dir, and all their descendants.

    Only this user's processes are readable in /proc, so nobody else's can match.
    """
    if not marker and not temp_dir:
        raise ValueError("need a marker or a temp dir, else every process would match")
    needle_env = f"{MARKER_VAR}={marker}".encode() if marker else None
    needle_cmd = temp_dir.encode() if temp_dir else None
    roots: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        if needle_env and needle_env in _read(entry / "environ").split(b"\0"):
            roots.add(int(entry.name))
        elif needle_cmd and needle_cmd in _read(entry / "cmdline"):
            roots.add(int(entry.name))
    # Descendants: Ray workers rename themselves (ray::IDLE), so the temp dir leaves
    # their command line; the ppid walk still finds them.
    children, found = _children(), set(roots)
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found - _own_lineage())


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def _name(pid: int) -> str:
    """The process's name as ps shows it (Ray actors rename themselves ray::...)."""
    return _read(Path(f"/proc/{pid}/cmdline")).split(b"\0")[0].decode(errors="replace")[:60]


def stop_pids(pids: Iterable[int], grace: float) -> tuple[int, list[str]]:
    """SIGTERM each pid, wait up to ``grace`` s, SIGKILL the rest.

    Returns how many were signalled and the names of those that needed SIGKILL.
    """
    pids = [p for p in pids if _alive(p)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    names = [f"{pid} {_name(pid)}" for pid in left]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids), names


def stop_cluster(pids: list[int], grace: float) -> tuple[int, list[str]]:
    """Stop a cluster's processes in Ray's own order (as ``ray stop`` does, by name):
    raylets first (they take their workers and agents with them), then the rest,
    then the GCS, which the others report to while they exit. Sent all at once,
    the GCS and the autoscaler monitor ignore SIGTERM and raylets linger 10 s.
    """
    def rank(pid: int) -> int:
        name = _read(Path(f"/proc/{pid}/cmdline")).split(b"\0")[0]
        return 0 if name.endswith(b"/raylet") else 2 if name.endswith(b"/gcs_server") else 1

    count, killed = 0, []
    for bucket in (0, 1, 2):
        # Re-read: children that exited with their raylet need no signal.
        n, k = stop_pids([p for p in pids if rank(p) == bucket and _alive(p)], grace / 3)
        count, killed = count + n, killed + k
    return count, killed


def stop_marked(marker: str, temp_dir: str, grace: float) -> tuple[int, list[str]]:
    """Stop one local cluster by its marker and temp dir, with a second look for
    processes forked while the first pass ran (a worker being started)."""
    count, killed = stop_cluster(cluster_pids(marker, temp_dir), grace)
    late = cluster_pids(marker, temp_dir)
    if late:
        n, k = stop_pids(late, 2.0)
        count, killed = count + n, killed + k
    return count, killed
