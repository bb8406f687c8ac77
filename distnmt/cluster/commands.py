"""``distnmt cluster start|add-node|stop|submit|logs|stop-job|env|pids``: a Ray head (and
more nodes) on this machine for ``ray job submit``, found and stopped by process id."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from distnmt.cluster.jobs import DEFAULT_PASSTHROUGH, ClusterError, job_paths, runtime_env
from distnmt.cluster.procs import MARKER_VAR, cluster_pids, stop_marked
from distnmt.cluster.run import LOOPBACK, free_ports


def repo_root() -> Path:
    """The checkout whose code jobs upload: the one holding this package, else the cwd."""
    here = Path(__file__).resolve().parents[2]
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
