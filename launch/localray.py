"""Helpers for the launch/ scripts that are awkward in bash. Standard library only.

    python launch/localray.py free-ports N
        N distinct TCP ports free on this machine right now, one line, space separated.
    python launch/localray.py pids --marker M --temp-dir D
        Process ids of one local Ray cluster (see ``cluster_pids``).
    python launch/localray.py stop --marker M --temp-dir D [--grace S]
        SIGTERM those processes, then SIGKILL what is left after S seconds.
    python launch/localray.py job-paths --config C --base DIR [--remote] [-- DISTNMT ARGS]
        ``--set`` values (one a line) making the config's data and run paths absolute.
    python launch/localray.py job-status JOB_ID
        SUCCEEDED, FAILED, STOPPED, RUNNING or PENDING, from RAY_API_SERVER_ADDRESS.
    python launch/localray.py runtime-env --working-dir DIR [--env NAME ...] [--set NAME=VALUE ...]
        The runtime_env JSON for ``ray job submit --runtime-env``, on stdout only.

Why process ids and not ``ray stop``: ``ray stop`` ends every Ray process of the
machine, other people's clusters included. A cluster started by start-head.sh
carries a marker variable (DISTNMT_RAY_CLUSTER=<random id>) in the environment of
every process it starts, and its own --temp-dir on the command line of its
daemons, so its processes can be found, and only those.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Iterable, NoReturn

MARKER_VAR = "DISTNMT_RAY_CLUSTER"

# Never uploaded with a job: version control, the virtual environment, data and
# everything runs produce. Ray refuses packages over 512 MiB and warns well before.
# gitignore syntax (Ray uses pathspec's gitwildmatch): a leading "/" anchors at the
# repository root, so "/data" leaves out the data folder but keeps distnmt/data/.
WORKING_DIR_EXCLUDES = [
    "/.git", "/.venv", "/data", "/prepared", "/runs", "/bench-results", "/wandb",
    "/build", "/dist", "__pycache__", "*.egg-info", ".pytest_cache", "*.pt", "*.ckpt",
]

# Forwarded to the job when set in the submitting shell (values never touch disk here).
DEFAULT_PASSTHROUGH = [
    "WANDB_API_KEY", "WANDB_MODE", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_BASE_URL",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports the kernel says are free; all held open at once so they differ.

    Another process may still take one before Ray binds it; start-head.sh retries.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))  # any interface: Ray's GCS binds all of them
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


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
    parents: dict[int, int] = {}
    roots: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        parents[pid] = _ppid(pid)
        if needle_env and needle_env in _read(entry / "environ").split(b"\0"):
            roots.add(pid)
        elif needle_cmd and needle_cmd in _read(entry / "cmdline"):
            roots.add(pid)
    # Descendants: Ray workers rename themselves (ray::IDLE), so the temp dir leaves
    # their command line; the ppid walk still finds them.
    found = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in found and pid not in found:
                found.add(pid)
                changed = True
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
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    names = [f"{pid} {_name(pid)}" for pid in left]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
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


def runtime_env(working_dir: str, passthrough: list[str], fixed: dict[str, str]) -> dict[str, object]:
    """runtime_env for a distnmt job: the code as working_dir (big paths left out) and the
    environment variables named in ``passthrough`` that are set here, plus ``fixed``."""
    env_vars = {name: os.environ[name] for name in passthrough if os.environ.get(name)}
    env_vars.update(fixed)
    return {"working_dir": working_dir, "excludes": WORKING_DIR_EXCLUDES, "env_vars": env_vars}


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit status 2, as the launch scripts and distnmt do."""
    print(f"[launch] error: {message}", file=sys.stderr)
    raise SystemExit(2)


# Config keys holding paths a job opens, per command. Relative ones would resolve
# inside the job's private copy of the working dir, which Ray deletes afterwards.
PATH_KEYS = {
    "prepare": ("data.source_dir", "data.prepared_dir"),
    "train": ("data.prepared_dir", "train.storage_path"),
}


def job_paths(config: str, distnmt_args: list[str], base: Path, local: bool, command: str = "train") -> list[str]:
    """``--set`` values that make the config's relative paths absolute (``base``-relative).

    For a local cluster the submitting machine's paths are the cluster's. For a remote
    one a relative path is an error: it must name shared storage on the cluster.
    """
    from distnmt.config import ConfigError, load_config  # the venv's distnmt, imported late

    sets = argparse.ArgumentParser(add_help=False)
    sets.add_argument("--set", dest="overrides", action="append", default=[])
    overrides = sets.parse_known_args(distnmt_args)[0].overrides
    try:
        cfg = load_config(Path(config), overrides)
    except ConfigError as err:
        _fail(str(err))
    out = []
    for key in PATH_KEYS[command]:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None or "://" in str(value) or os.path.isabs(str(value)):
            continue  # None: e.g. prepare downloads; URIs go to Ray's storage layer
        if not local:
            _fail(f"{key}={value!r} is relative; on a cluster it must be on shared storage, "
                  f"e.g. --set {key}=/mnt/shared/...")
        out.append(f"{key}={(base / str(value)).resolve()}")
    return out


def job_status(job_id: str) -> str:
    """The job's status (SUCCEEDED, FAILED, STOPPED, RUNNING, PENDING) from the job server
    in RAY_API_SERVER_ADDRESS; the ray CLI's wording of it changes with log styles."""
    from ray.job_submission import JobSubmissionClient  # the venv's ray, imported late

    client = JobSubmissionClient(os.environ["RAY_API_SERVER_ADDRESS"])
    return str(client.get_job_status(job_id).value)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="localray.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("free-ports")
    p.add_argument("count", type=int)
    for name in ("pids", "stop"):
        p = sub.add_parser(name)
        p.add_argument("--marker", default="")
        p.add_argument("--temp-dir", default="")
        p.add_argument("--grace", type=float, default=10.0)
    p = sub.add_parser("runtime-env")
    p.add_argument("--working-dir", required=True)
    p.add_argument("--env", action="append", default=[], metavar="NAME", help="pass this variable through if set")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a fixed (non-secret) variable")
    p = sub.add_parser("job-paths")
    p.add_argument("--config", required=True)
    p.add_argument("--base", required=True, type=Path)
    p.add_argument("--remote", action="store_true")
    p.add_argument("--command", choices=sorted(PATH_KEYS), default="train")
    p.add_argument("distnmt_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("job-status")
    p.add_argument("job_id")
    args = parser.parse_args(argv)

    if args.cmd == "free-ports":
        print(" ".join(map(str, free_ports(args.count))))
    elif args.cmd == "pids":
        print(" ".join(map(str, cluster_pids(args.marker, args.temp_dir))))
    elif args.cmd == "stop":
        count, killed = stop_cluster(cluster_pids(args.marker, args.temp_dir), args.grace)
        # A second look: a process forked while the first pass ran (a worker being
        # started) would otherwise survive.
        late = cluster_pids(args.marker, args.temp_dir)
        if late:
            n, k = stop_pids(late, 2.0)
            count, killed = count + n, killed + k
        print(f"[localray] stopped {count} process(es), {len(killed)} of them with SIGKILL {killed}")
    elif args.cmd == "job-status":
        print(job_status(args.job_id))
    elif args.cmd == "job-paths":
        rest = args.distnmt_args[1:] if args.distnmt_args[:1] == ["--"] else args.distnmt_args
        for item in job_paths(args.config, rest, args.base, local=not args.remote, command=args.command):
            print(item)
    else:
        fixed = dict(item.split("=", 1) for item in args.set)
        env = runtime_env(args.working_dir, DEFAULT_PASSTHROUGH + args.env, fixed)
        json.dump(env, sys.stdout)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
