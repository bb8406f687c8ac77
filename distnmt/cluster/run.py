"""Ray for a distnmt run: ``start_or_join(cfg, run_dir)``, what ``distnmt train`` does
before training. It joins the cluster it is given (``train.ray_address`` or RAY_ADDRESS,
which ``ray job submit`` sets), or starts a local one that listens on 127.0.0.1 only,
sized for one machine. Either way every process of the run gets the cluster's address
and the run's Ray Train settings in its environment (Ray's state API, used by Ray
Train's placement-group cleaner, would otherwise look for "the" cluster of the machine
and fail when there are two), and Ray's informational lines go to a log file in the
run directory (logs.py)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from distnmt.cluster.logs import _route_driver_logs, _route_worker_logs

if TYPE_CHECKING:
    from distnmt.config import Config


NAMESPACE = "distnmt"
LOOPBACK = "127.0.0.1"
_SINGLE_MACHINE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's: "0" = one machine, loopback only
LOG_DIR = "logs"  # under the run directory: ray-<time>.log, one per start of the run

# A local run passes checkpoints through files, never through the object store; Ray's
# default (30% of RAM) only reserves shared memory nobody uses. 256 MiB is well above
# Ray's minimum (75 MiB) and what the evaluator's handles and Train's reports need.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


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

        # Ray first, with the routing still in place: its actors (Ray Train's controller)
        # go on forwarding lines until the disconnect, and one that came after the
        # routing's undo went to the console past the run's closing BLEU line.
        # ray.shutdown() takes the printer out by name; the undo then leaves it out
        # (the next ray.init installs its own).
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            while self._restore:
                self._restore.pop()()


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


def ray_log_path(run_dir: Path) -> Path:
    """Where this attempt's informational Ray lines go: one file per start, in the run."""
    return run_dir / LOG_DIR / f"ray-{time.strftime('%Y%m%d-%H%M%S')}.log"


def route_local_mode_logs(cfg: "Config", run_dir: Path) -> tuple[Path, Callable[[], None]]:
    """``train.workers: 0`` starts no cluster, but Ray Train's loggers still speak in this
    process: the same routing as a cluster run's driver. Returns the log file and the undo."""
    log_path = ray_log_path(run_dir)
    return log_path, _route_driver_logs(log_path, cfg.logging.ray)


def start_or_join(cfg: "Config", run_dir: Path) -> RayHandle:
    """Join the cluster the config or RAY_ADDRESS names, or start a local loopback one.

    The returned handle's ``stop()`` disconnects, stopping a cluster this call started.
    """
    import ray

    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = ray_log_path(run_dir)
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
