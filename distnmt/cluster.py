"""Ray for a distnmt run, and the local clusters of ``distnmt cluster``.

Two jobs, one module (the orchestration layer, above train/ and evaluate/):

- ``start_or_join(cfg, run_dir)``: what ``distnmt train`` does before training. It
  joins the cluster it is given (``train.ray_address`` or RAY_ADDRESS, which ``ray job
  submit`` sets), or starts a local one that listens on 127.0.0.1 only, sized for one
  machine. Either way every process of the run gets the cluster's address in its
  environment (Ray's state API, used by Ray Train's placement-group cleaner, would
  otherwise look for "the" cluster of the machine and fail when there are two), and
  Ray's informational lines go to a log file in the run directory instead of the
  console (``logging.ray: info`` brings them back).
- ``distnmt cluster start|add-node|stop|submit|logs|stop-job|env``: a Ray head (and
  more nodes) on this machine for ``ray job submit``, found and stopped by process id,
  never with ``ray stop`` (which stops every Ray cluster of the machine).

Ray is imported inside the functions that need it: the cluster commands start fast,
and importing this module costs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, TextIO

if TYPE_CHECKING:
    from distnmt.config import Config

NAMESPACE = "distnmt"
LOOPBACK = "127.0.0.1"
MARKER_VAR = "DISTNMT_RAY_CLUSTER"
_SINGLE_MACHINE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's: "0" = one machine, loopback only
LOG_DIR = "logs"  # under the run directory: ray-<time>.log, one per start of the run

# A local run passes checkpoints through files, never through the object store; Ray's
# default (30% of RAM) only reserves shared memory nobody uses. 256 MiB is well above
# Ray's minimum (75 MiB) and what the evaluator's handles and Train's reports need.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


# ---------------------------------------------------------------- a run's Ray


@dataclasses.dataclass
class RayHandle:
    """The Ray a run uses: how to reach it, where its log lines went, how to let go."""

    address: str               # GCS address, host:port (what RAY_ADDRESS holds in the run's processes)
    owned: bool                # True: this process started the cluster, and stop() ends it
    log_path: Optional[Path]   # Ray's informational lines of this run
    _restore: list[Callable[[], None]] = dataclasses.field(default_factory=list, repr=False)

    def stop(self) -> None:
        """Disconnect (and, for a local cluster, stop it); undo the log routing."""
        import ray

        # Ray's printer back first: ray.shutdown() removes it by name, and a handler
        # put back after that would print every line twice under the next ray.init.
        while self._restore:
            self._restore.pop()()
        if ray.is_initialized():
            ray.shutdown()


def free_ports(count: int, host: str = "") -> list[int]:
    """``count`` distinct ports the kernel says are free; all held open at once so they differ.

    Another process may still take one before Ray binds it; callers retry.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _job_env_vars() -> dict[str, str]:
    """env_vars of the runtime_env ``ray job submit`` gave this driver (empty outside a job)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return {}
    return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})


def start_or_join(cfg: "Config", run_dir: Path) -> RayHandle:
    """Join the cluster the config or RAY_ADDRESS names, or start a local loopback one.

    The returned handle's ``stop()`` disconnects, stopping a cluster this call started.
    """
    import ray

    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / LOG_DIR / f"ray-{time.strftime('%Y%m%d-%H%M%S')}.log"
    restore: list[Callable[[], None]] = []
    restore.append(_route_driver_logs(log_path, cfg.logging.ray))
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    try:
        run_env = run_env_vars(cfg)
        handle = _join(address, log_path, run_env) if address else start_local(log_path, env_vars=run_env)
    except BaseException:
        for undo in reversed(restore):
            undo()
        raise
    handle._restore = restore + handle._restore
    try:
        handle._restore.append(_route_worker_logs(log_path, cfg.logging.ray))
    except BaseException:
        handle.stop()
        raise
    return handle


def run_env_vars(cfg: "Config") -> dict[str, str]:
    """Environment every process of the run gets (its runtime_env): the Ray Train settings
    the config chooses, read by the controller actor, which this driver does not run."""
    return {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": f"{cfg.train.worker_start_timeout_s:g}"}


def _join(address: str, log_path: Path, run_env: Optional[dict[str, str]] = None) -> RayHandle:
    import ray
    from ray._private.services import canonicalize_bootstrap_address_or_die

    # A job's own runtime_env may set a variable already; Ray refuses the same key twice.
    job_env = _job_env_vars()
    env_vars = {name: value for name, value in (run_env or {}).items() if name not in job_env}
    gcs = address
    if not address.startswith("ray://"):
        gcs = canonicalize_bootstrap_address_or_die(address)
        if "RAY_ADDRESS" not in job_env:
            env_vars["RAY_ADDRESS"] = gcs
    ray.init(address=address, namespace=NAMESPACE, runtime_env={"env_vars": env_vars} if env_vars else None)
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = gcs
    return RayHandle(gcs, owned=False, log_path=log_path, _restore=[functools.partial(_set_env, "RAY_ADDRESS", previous)])


def _set_env(name: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def start_local(log_path: Optional[Path] = None, attempts: int = 3,
                env_vars: Optional[dict[str, str]] = None) -> RayHandle:
    """A new Ray cluster of this machine only, for a run, a benchmark or a test: every
    Ray process on 127.0.0.1, the GCS on a port chosen here so that the run's processes
    are told it (RAY_ADDRESS) before they start, no prestarted idle workers, a small
    object store. ``env_vars``: more variables for every process of the run (its
    runtime_env, as ``run_env_vars``). ``handle.stop()`` ends it."""
    import ray
    from ray._private import ray_constants

    error: Optional[BaseException] = None
    for _ in range(attempts):
        gcs_port, dashboard_port = free_ports(2, LOOPBACK)
        gcs = f"{LOOPBACK}:{gcs_port}"
        # Read by Ray when it starts the head's GCS (there is no ray.init argument for it).
        previous = {name: os.environ.get(name) for name in ("RAY_GCS_SERVER_PORT", _SINGLE_MACHINE_VAR)}
        os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
        # ray.init turns _node_ip_address="127.0.0.1" into the machine's address
        # (services.resolve_ip_for_localhost) unless Ray is in its single-machine mode,
        # the default on macOS and Windows: then every Ray process binds 127.0.0.1.
        # The variable reaches the processes Ray starts; the constant, this one.
        os.environ[_SINGLE_MACHINE_VAR] = "0"
        was_cluster = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            # address="local": a new cluster even when `ray start` runs on this machine
            # (plain ray.init() would join that one).
            ray.init(
                address="local", namespace=NAMESPACE,
                _node_ip_address=LOOPBACK,
                # The dashboard is also the state API that Ray Train's placement-group
                # cleaner asks; without it the controller repeats warnings. Loopback only.
                include_dashboard=True, dashboard_host=LOOPBACK, dashboard_port=dashboard_port,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                # Idle workers prestarted for tasks a run never sends (one per CPU): off.
                # Idle workers kept 2 min instead of Ray's 1 s: the validation hook's task
                # (one per checkpoint) then reuses its process instead of starting Python
                # and Ray again each time, which took ~4 s of a checkpoint's score lag.
                _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False,
                                "idle_worker_killing_time_threshold_ms": 120_000},
                runtime_env={"env_vars": {**(env_vars or {}), "RAY_ADDRESS": gcs}},
            )
        except (ConnectionError, RuntimeError) as err:  # the port was taken meanwhile
            error = err
            if ray.is_initialized():
                ray.shutdown()
            continue
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = was_cluster
            for name, value in previous.items():
                _set_env(name, value)
        previous_address = os.environ.get("RAY_ADDRESS")
        os.environ["RAY_ADDRESS"] = gcs  # the driver's own state-API calls
        return RayHandle(gcs, owned=True, log_path=log_path,
                         _restore=[functools.partial(_set_env, "RAY_ADDRESS", previous_address)])
    raise RuntimeError(f"could not start a local Ray cluster in {attempts} attempts: {error}")


# ---------------------------------------------------------------- log routing

# A line a user must see: a warning, an error, a traceback, a failure; or a line of
# Ray's C++ core logged at severity W, E or F ("[2026-12-02 06:04:12,438 E 15997 16045] ...").
_ACTIONABLE = re.compile(
    r"warn|error|exception|traceback|fail|fatal|abort|killed|timed? ?out|unable|cannot|could not|"
    r"not found|invalid|denied|out of memory|oom|deprecat|^\s+File \"|"
    r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [WEF] \d+ \d+\]",
    re.IGNORECASE,
)


def is_ray_info(line: str, is_err: bool) -> bool:
    """True for a line forwarded from a Ray process that only informs: written to stderr
    (where Ray's loggers, Ray Train's included, write without a level) and naming no
    warning, error or failure. stdout is the program's own output (distnmt's progress,
    the evaluator's scores) and is never held back."""
    return is_err and not _ACTIONABLE.search(line)


class _LogFile:
    """Appends lines to the run's Ray log, opened on first use (line-buffered)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Optional[TextIO] = None

    def write(self, text: str) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8", buffering=1)
        self._handle.write(text if text.endswith("\n") else text + "\n")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


_log_files: dict[Path, _LogFile] = {}


def _log_file(path: Path) -> _LogFile:
    return _log_files.setdefault(path, _LogFile(path))


def _route_driver_logs(log_path: Path, level: str) -> Callable[[], None]:
    """This process's ``ray`` logger: INFO to the run's log file, the console from
    WARNING up (unless ``logging.ray: info``). Returns the undo."""
    logger = logging.getLogger("ray")
    handler = logging.StreamHandler(_log_file(log_path))  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    levels = [(h, h.level) for h in logger.handlers if h is not handler]
    if level != "info":
        for h, _ in levels:
            h.setLevel(logging.WARNING)

    def undo() -> None:
        logger.removeHandler(handler)
        for h, old in levels:
            h.setLevel(old)

    return undo


def _route_worker_logs(log_path: Path, level: str) -> Callable[[], None]:
    """The lines Ray forwards from the run's workers, actors and raylets: all of them to
    the run's log file; to the console all but Ray's informational ones (or all, with
    ``logging.ray: info``). Replaces Ray's own printer; returns the undo."""
    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    original = dict(dispatcher.handlers).get("ray_print_logs")  # a list of (name, handler)
    if original is None:  # log_to_driver off, or not a driver: nothing is forwarded here
        return lambda: None
    log = _log_file(log_path)

    def route(data: dict[str, Any]) -> None:
        lines = data.get("lines") or []
        who = data.get("actor_name") or data.get("task_name") or ""
        tag = f"({who} pid={data.get('pid')}{' stderr' if data.get('is_err') else ''}) "
        for line in lines:
            log.write(tag + line)
        if level == "info":
            original(data)
            return
        # A traceback is one batch: keep it whole when any line of it is actionable.
        if any(_ACTIONABLE.search(line) for line in lines):
            original(data)
            return
        keep = [line for line in lines if not is_ray_info(line, bool(data.get("is_err")))]
        if keep:
            original({**data, "lines": keep})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", route)

    def undo() -> None:
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", original)
        log.close()
        _log_files.pop(log_path, None)

    return undo


# ---------------------------------------------------------------- process trees, memory


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


# ---------------------------------------------------------------- jobs

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

# Config keys holding paths a job opens, per command. Relative ones would resolve
# inside the job's private copy of the working dir, which Ray deletes afterwards.
PATH_KEYS = {
    "prepare": ("data.source_dir", "data.prepared_dir"),
    "train": ("data.prepared_dir", "train.storage_path"),
}


class ClusterError(Exception):
    """A user mistake or a cluster that would not start: one line, exit status 2."""


def runtime_env(working_dir: str, passthrough: list[str], fixed: dict[str, str]) -> dict[str, object]:
    """runtime_env for a distnmt job: the code as working_dir (big paths left out) and the
    environment variables named in ``passthrough`` that are set here, plus ``fixed``."""
    env_vars = {name: os.environ[name] for name in passthrough if os.environ.get(name)}
    env_vars.update(fixed)
    return {"working_dir": working_dir, "excludes": WORKING_DIR_EXCLUDES, "env_vars": env_vars}


def job_paths(config: str, distnmt_args: list[str], base: Path, local: bool, command: str = "train") -> list[str]:
    """``--set`` values that make the config's relative paths absolute (``base``-relative).

    For a local cluster the submitting machine's paths are the cluster's. For a remote
    one a relative path is an error: it must name shared storage on the cluster.
    """
    from distnmt.config import ConfigError, load_config

    sets = argparse.ArgumentParser(add_help=False)
    sets.add_argument("--set", dest="overrides", action="append", default=[])
    overrides = sets.parse_known_args(distnmt_args)[0].overrides
    try:
        cfg = load_config(Path(config), overrides)
    except ConfigError as err:
        raise ClusterError(str(err)) from None
    out = []
    for key in PATH_KEYS[command]:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None or "://" in str(value) or os.path.isabs(str(value)):
            continue  # None: e.g. prepare downloads; URIs go to Ray's storage layer
        if not local:
            raise ClusterError(f"{key}={value!r} is relative; on a cluster it must be on shared storage, "
                               f"e.g. --set {key}=/mnt/shared/...")
        out.append(f"{key}={(base / str(value)).resolve()}")
    return out


# ---------------------------------------------------------------- distnmt cluster ...


def repo_root() -> Path:
    """The checkout whose code jobs upload: the one holding this package, else the cwd."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def state_dir() -> Path:
    """One state directory per checkout, so two clones (or users) never share a cluster.

    ``$DISTNMT_RAY_STATE``, else /tmp/distnmt-ray-<uid>-<hash of the checkout>:
      cluster.env   addresses, the marker that tags its processes, its Ray temp dir
      auth_token    the cluster's Ray auth token (mode 600)
      ray/          Ray's --temp-dir (short: Ray's socket paths must fit 107 bytes)
      node-N/       temp dirs of the nodes `add-node` joined
      last-job      id of the last job `submit` sent there
    """
    if os.environ.get("DISTNMT_RAY_STATE"):
        return Path(os.environ["DISTNMT_RAY_STATE"])
    digest = hashlib.sha1(str(repo_root()).encode()).hexdigest()[:8]
    return Path(f"/tmp/distnmt-ray-{os.getuid()}-{digest}")


def _say(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


def _ray_cli() -> str:
    """The ray CLI beside this Python (the venv's), else the PATH's."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise ClusterError("ray not found; run launch/setup.sh first")
    return found


def read_cluster_env(state: Path) -> dict[str, str]:
    path = state / "cluster.env"
    if not path.is_file():
        return {}
    return dict(line.split("=", 1) for line in path.read_text(encoding="utf-8").splitlines() if "=" in line)


def local_cluster_running(state: Path) -> bool:
    info = read_cluster_env(state)
    return bool(info) and bool(cluster_pids(info.get(MARKER_VAR, ""), str(state / "ray")))


def local_env(state: Path) -> dict[str, str]:
    """What the ray CLI and drivers need to reach the local cluster in ``state``: GCS
    address, job server URL, token auth with this cluster's own token."""
    info = read_cluster_env(state)
    if not info:
        raise ClusterError(f"no local Ray head in {state}; start one with `distnmt cluster start` "
                           "(launch/start-head.sh), or pass --address")
    return {"RAY_ADDRESS": info["GCS_ADDRESS"], "RAY_API_SERVER_ADDRESS": info["DASHBOARD_URL"],
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state / "auth_token")}


def select_cluster(address: Optional[str], state: Path) -> tuple[str, dict[str, str]]:
    """("local" | "remote", environment for the ray CLI): the address given (or
    RAY_API_SERVER_ADDRESS), else the local head of ``state``, else RAY_ADDRESS."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address and (state / "cluster.env").is_file():
        return "local", local_env(state)
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterError("no cluster: start a local head with `distnmt cluster start` (launch/start-head.sh), "
                           "or pass --address http://HEAD:8265")
    env = {"RAY_API_SERVER_ADDRESS": address}
    # A token given as RAY_AUTH_TOKEN(_PATH) turns token auth on for the CLI; Ray does not.
    if not os.environ.get("RAY_AUTH_MODE") and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        env["RAY_AUTH_MODE"] = "token"
    return "remote", env


def start_head(state: Path, num_cpus: Optional[str], num_gpus: Optional[str], dashboard_host: str,
               extra: Sequence[str], attempts: int = 3) -> dict[str, str]:
    """A Ray head for `ray job submit` on free ports, token auth, marked processes.

    - Every port Ray would take by default (6379, 8265, 10001, 52365) is a free one
      picked now: other people run Ray on shared machines.
    - The dashboard (the job server) listens on 127.0.0.1 unless told otherwise.
    - RAY_LOGGER_LEVEL=warning: at INFO, Ray's runtime-env agent writes each job's
      runtime_env, env_vars values included (WANDB_API_KEY...), into its log file.
    - The node address is Ray's default (this machine's), so that nodes of other
      machines can join: a head is a real cluster's head. A run without a cluster
      (`distnmt train` alone) starts its own on 127.0.0.1 instead.
    """
    if local_cluster_running(state):
        info = read_cluster_env(state)
        _say(f"a head is already running for this checkout: dashboard {info['DASHBOARD_URL']}, GCS {info['GCS_ADDRESS']}")
        return info
    shutil.rmtree(state, ignore_errors=True)  # a stale state (crashed or killed cluster)
    state.mkdir(parents=True)
    state.chmod(0o700)  # token and logs: this user only
    token = state / "auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    marker = secrets.token_hex(8)
    resources = [*(["--num-cpus", num_cpus] if num_cpus else []), *(["--num-gpus", num_gpus] if num_gpus else [])]
    env = {**os.environ, MARKER_VAR: marker, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_LOGGER_LEVEL": "warning"}
    log = state / "ray-start.log"
    for attempt in range(1, attempts + 1):
        gcs_port, dash_port, client_port, agent_port = free_ports(4)
        _say(f"starting Ray head (attempt {attempt}): GCS port {gcs_port}, dashboard {dashboard_host}:{dash_port}")
        with open(log, "w", encoding="utf-8") as out:
            started = subprocess.run(
                [_ray_cli(), "start", "--head", "--disable-usage-stats", "--port", str(gcs_port),
                 "--dashboard-host", dashboard_host, "--dashboard-port", str(dash_port),
                 "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent_port),
                 "--temp-dir", str(state / "ray"), *resources, *extra],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        if started.returncode == 0:
            break
        print("\n".join(log.read_text(errors="replace").splitlines()[-5:]), file=sys.stderr)
        stop_marked(marker, str(state / "ray"), 10.0)
    else:
        raise ClusterError(f"ray start failed {attempts} times; log: {log}")
    # Ray writes the GCS address it chose (the machine's IP, even for a local head).
    gcs_address = (state / "ray" / "ray_current_cluster").read_text().strip()
    host = LOOPBACK if dashboard_host == "0.0.0.0" else dashboard_host
    info = {"GCS_ADDRESS": gcs_address, "DASHBOARD_URL": f"http://{host}:{dash_port}", MARKER_VAR: marker,
            "RAY_TEMP_DIR": str(state / "ray")}
    (state / "cluster.env").write_text("".join(f"{k}={v}\n" for k, v in info.items()), encoding="utf-8")
    _say(f"Ray head up: GCS {gcs_address}, dashboard and job server {info['DASHBOARD_URL']}")
    _say(f"state in {state}; submit with: distnmt cluster submit configs/quickstart.yaml; "
         "stop with: distnmt cluster stop")
    _say('for plain ray CLI commands: eval "$(distnmt cluster env)"')
    return info


def add_node(state: Path, num_cpus: Optional[str], num_gpus: Optional[str], extra: Sequence[str],
             attempts: int = 3) -> Path:
    """One more Ray node on this machine joined to the local head: its own temp dir
    (node-N), a free agent port, the cluster's marker (so `stop` stops it too)."""
    if not local_cluster_running(state):
        raise ClusterError(f"no local Ray head running for {state}; start one with `distnmt cluster start`")
    info = read_cluster_env(state)
    env = {**os.environ, **local_env(state), MARKER_VAR: info[MARKER_VAR], "RAY_LOGGER_LEVEL": "warning"}
    env.pop("RAY_ADDRESS")  # `ray start --address` is explicit
    n = 1
    while (state / f"node-{n}").exists():  # short names: Ray's socket paths must fit 107 bytes
        n += 1
    node_dir = state / f"node-{n}"
    node_dir.mkdir()
    resources = [*(["--num-cpus", num_cpus] if num_cpus else []), *(["--num-gpus", num_gpus] if num_gpus else [])]
    log = node_dir / "ray-start.log"
    for _ in range(attempts):
        (agent_port,) = free_ports(1)
        with open(log, "w", encoding="utf-8") as out:
            started = subprocess.run(
                [_ray_cli(), "start", "--address", info["GCS_ADDRESS"], "--disable-usage-stats",
                 "--dashboard-agent-listen-port", str(agent_port), "--temp-dir", str(node_dir), *resources, *extra],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        if started.returncode == 0:
            _say(f"node {n} joined {info['GCS_ADDRESS']} (temp dir {node_dir})")
            return node_dir
        print("\n".join(log.read_text(errors="replace").splitlines()[-5:]), file=sys.stderr)
        stop_marked("", f"{node_dir}/", 10.0)
    raise ClusterError(f"ray start --address {info['GCS_ADDRESS']} failed {attempts} times; log: {log}")


def stop_head(state: Path, keep_logs: bool, grace: float = 15.0) -> None:
    """Stop the local head and its nodes by process id; remove the state unless keep_logs."""
    info = read_cluster_env(state)
    if not info:
        _say(f"no local Ray head recorded in {state}; nothing to stop")
        return
    marker = info.get(MARKER_VAR)
    if not marker:
        raise ClusterError(f"{state}/cluster.env has no {MARKER_VAR} line; stop its processes by hand")
    # Grace period: raylets and workers exit cleanly on SIGTERM within a few seconds.
    count, killed = stop_marked(marker, f"{state}/", grace)
    _say(f"stopped {count} process(es), {len(killed)} of them with SIGKILL {killed}")
    if keep_logs:
        for name in ("cluster.env", "auth_token"):
            (state / name).unlink(missing_ok=True)
        _say(f"logs kept in {state / 'ray'}")
    else:
        shutil.rmtree(state, ignore_errors=True)


def submit(state: Path, config: str, distnmt_args: list[str], address: Optional[str], command: str,
           passthrough: list[str], submission_id: Optional[str], wait: bool) -> int:
    """`ray job submit` of `distnmt COMMAND --config CONFIG ...`, this checkout as working_dir.

    Secrets travel in the runtime_env through a pipe: never on a command line, never in
    a file. On the local head relative data and run paths become absolute paths of this
    checkout; on a remote cluster they must be absolute already (shared storage).
    """
    root = repo_root()
    if not Path(config).is_file():
        raise ClusterError(f"{config}: no such config file")
    resolved = Path(config).resolve()
    if root not in resolved.parents:
        raise ClusterError(f"{resolved} is outside {root}: only files of the checkout are uploaded with the job")
    relative = str(resolved.relative_to(root))
    kind, env = select_cluster(address, state)
    paths = job_paths(str(resolved), distnmt_args, root, local=kind == "local", command=command)
    path_sets = [arg for item in paths for arg in ("--set", item)]
    submission_id = submission_id or f"distnmt-{command}-{resolved.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if kind == "local":
        (state / "last-job").write_text(submission_id + "\n", encoding="utf-8")
    _say(f"submitting {submission_id} to {env['RAY_API_SERVER_ADDRESS']} ({kind}): distnmt {command} "
         f"--config {relative} {' '.join(distnmt_args)} {' '.join(path_sets)}")
    # RAY_LOGGER_LEVEL=info: the cluster's daemons run at warning (see start_head); the
    # job's own driver and workers keep Ray's usual INFO lines (distnmt routes them).
    spec = json.dumps(runtime_env(str(root), DEFAULT_PASSTHROUGH + passthrough, {"RAY_LOGGER_LEVEL": "info"}))
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, spec.encode())  # a few hundred bytes: fits the pipe's buffer
    finally:
        os.close(write_end)
    try:
        result = subprocess.run(
            [_ray_cli(), "job", "submit", *([] if wait else ["--no-wait"]), "--submission-id", submission_id,
             "--runtime-env", f"/dev/fd/{read_end}", "--",
             "python", "-m", "distnmt.cli", command, "--config", relative, *distnmt_args, *path_sets],
            cwd=root, env={**os.environ, **env}, pass_fds=(read_end,))
    finally:
        os.close(read_end)
    if not wait and result.returncode == 0:
        _say(f"follow: distnmt cluster logs {submission_id}   stop: distnmt cluster stop-job {submission_id}")
    return result.returncode


def _job_id(job: Optional[str], state: Path, usage: str) -> str:
    if job:
        return job
    last = state / "last-job"
    if last.is_file():
        return last.read_text().strip()
    raise ClusterError(f"usage: {usage} (no last job recorded in {state})")


def job_status(job_id: str, env: dict[str, str]) -> str:
    """The job's status (SUCCEEDED, FAILED, STOPPED, RUNNING, PENDING), asked in a fresh
    process: Ray reads the auth mode once per process."""
    code = ("import os, sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(C(os.environ['RAY_API_SERVER_ADDRESS']).get_job_status(sys.argv[1]).value)")
    out = subprocess.run([sys.executable, "-c", code, job_id], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120)
    return out.stdout.strip() or "unknown"


def logs(state: Path, job: Optional[str], address: Optional[str]) -> int:
    """Follow a job's logs until it ends; 0 only if it SUCCEEDED."""
    _, env = select_cluster(address, state)
    job_id = _job_id(job, state, "distnmt cluster logs [--address URL] JOB_ID")
    subprocess.run([_ray_cli(), "job", "logs", "--follow", job_id], env={**os.environ, **env})
    # `ray job logs` exits 0 whatever the job's fate; ask the job server.
    status = job_status(job_id, env)
    _say(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def stop_job(state: Path, job: Optional[str], address: Optional[str]) -> int:
    """Stop a running job and wait until it has; the cluster keeps running."""
    _, env = select_cluster(address, state)
    job_id = _job_id(job, state, "distnmt cluster stop-job [--address URL] JOB_ID")
    return subprocess.run([_ray_cli(), "job", "stop", job_id], env={**os.environ, **env}).returncode


def add_parser(sub: Any) -> None:
    """`distnmt cluster ...` under the CLI's subcommands."""
    p = sub.add_parser("cluster", help="a Ray cluster on this machine; ray job submit, logs, stop",
                       description=main.__doc__)
    csub = p.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    for name, text in (("start", "start a local Ray head on free ports (token auth, dashboard on 127.0.0.1)"),
                       ("add-node", "join one more Ray node on this machine to the local head")):
        q = csub.add_parser(name, help=text, description=text)
        q.add_argument("--num-cpus")
        q.add_argument("--num-gpus")
        if name == "start":
            q.add_argument("--dashboard-host", default=LOOPBACK,
                           help="where the dashboard/job server listens (0.0.0.0 exposes job submission)")
        q.add_argument("ray_args", nargs="*", help="after --: more `ray start` arguments")
    q = csub.add_parser("stop", help="stop the local head and its nodes, by process id (never `ray stop`)")
    q.add_argument("--keep-logs", action="store_true", help="keep Ray's logs in the state directory")
    q.add_argument("--temp-dir", help="stop only the node whose Ray temp dir this is (e.g. STATE/node-1/: "
                                      "a lost node, for tests of elastic runs)")
    q.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")
    q = csub.add_parser("submit", help="ray job submit a distnmt run (this checkout as working_dir)",
                        description=submit.__doc__)
    q.add_argument("--address", help="the cluster's job server, e.g. http://127.0.0.1:8265 (default: "
                                     "RAY_API_SERVER_ADDRESS, else the local head, else RAY_ADDRESS)")
    q.add_argument("--prepare", action="store_true", help="run `distnmt prepare` instead of `distnmt train`")
    q.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="pass this environment variable to the job (repeatable); the W&B ones always are, when set")
    q.add_argument("--id", dest="submission_id", help="submission id (default distnmt-<command>-<config>-<time>)")
    q.add_argument("--no-wait", action="store_true", help="return once submitted")
    q.add_argument("config", help="experiment YAML inside this checkout")
    q.add_argument("distnmt_args", nargs=argparse.REMAINDER, help="--set KEY=VALUE ... for the job")
    for name, text in (("logs", "follow a job's logs; exit 0 only if it succeeded"),
                       ("stop-job", "stop a running job (the cluster keeps running)")):
        q = csub.add_parser(name, help=text, description=text)
        q.add_argument("--address")
        q.add_argument("job", nargs="?", help="job id (default: the last one submitted to the local head)")
    csub.add_parser("env", help='exports for the plain ray CLI: eval "$(distnmt cluster env)"')
    q = csub.add_parser("pids", help="process ids of a local cluster (by marker and/or temp dir)")
    q.add_argument("--marker", default="")
    q.add_argument("--temp-dir", default="")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """A Ray cluster on this machine (one node or more) for `ray job submit`, and jobs
    on any cluster. State (addresses, the cluster's own token, Ray's logs) in
    $DISTNMT_RAY_STATE, default /tmp/distnmt-ray-<uid>-<hash of the checkout>."""
    state = state_dir()
    action = args.cluster_command
    try:
        if action == "start":
            start_head(state, args.num_cpus, args.num_gpus, args.dashboard_host, args.ray_args)
        elif action == "add-node":
            add_node(state, args.num_cpus, args.num_gpus, args.ray_args)
        elif action == "stop" and args.temp_dir:
            count, killed = stop_marked("", args.temp_dir, args.grace)
            _say(f"stopped {count} process(es), {len(killed)} of them with SIGKILL {killed}")
        elif action == "stop":
            stop_head(state, args.keep_logs, args.grace)
        elif action == "submit":
            rest = args.distnmt_args[1:] if args.distnmt_args[:1] == ["--"] else args.distnmt_args
            return submit(state, args.config, rest, args.address, "prepare" if args.prepare else "train",
                          args.env, args.submission_id, not args.no_wait)
        elif action == "logs":
            return logs(state, args.job, args.address)
        elif action == "stop-job":
            return stop_job(state, args.job, args.address)
        elif action == "env":
            for name, value in local_env(state).items():
                print(f"export {name}={_shell_quote(value)}")
        elif action == "pids":
            print(" ".join(map(str, cluster_pids(args.marker, args.temp_dir))))
    except ClusterError as err:
        print(f"distnmt cluster: error: {err}", file=sys.stderr)
        return 2
    return 0


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)
