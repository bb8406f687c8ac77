"""`ray job submit` end to end, through the launch/ scripts a user runs: a real Ray
head on free ports (dashboard on 127.0.0.1, token auth); the quickstart config
submitted with a tiny model while a local `distnmt train` runs beside it (that run's
console, sockets, processes and checkpoints checked too: tests/integration/local_run.py
watches it), its checkpoints and evaluator scores found in the run directory, a secret
passed through without touching disk; a second job stopped while it runs; the RayJob
entrypoint through the plain ray CLI; logs.sh. The head is stopped by process id in the
fixture's teardown, and the test checks that none of its processes is left."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Iterator

import pytest

from distnmt.checkpoint import load_checkpoint
from distnmt.cluster import is_loopback

from local_run import Watched, watch  # tests/integration/local_run.py (pytest puts this folder on sys.path)

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.beside]

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SHARED = REPO.parent / "shared" / "data" / "wmt14-en-fr"
# A model small enough for a 30-step run in well under a minute on 2 busy cores.
TINY = [
    "model.embed_size=32", "model.hidden_size=48", "model.align_size=48", "model.maxout_size=32",
    "data.max_len=30", "data.max_tokens=600", "data.vocab_size=800",
    "optim.name=adam", "optim.lr=0.003", "train.workers=2", "train.precision=fp32",
    "train.cpus_per_worker=0.9", "eval.num_cpus=0.2",
    "eval.beam_size=1", "eval.max_sentences=10", "eval.batch_sentences=10", "logging.log_every=10",
    # Nothing here checks the end-of-run newstest2014 score or figures (test_evaluator_ray does).
    "eval.test_at_end=false", "eval.figures=false",
]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _clean_env(state: Path) -> dict[str, str]:
    """The test's environment minus anything pointing at another Ray cluster."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}}
    env.update(DISTNMT_RAY_STATE=str(state), WANDB_MODE="offline", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    return env


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else "python3"


def _cluster_pids(state: Path, marker: str, env: dict[str, str]) -> list[int]:
    out = _run([PYTHON, "-m", "distnmt.cli", "cluster", "pids", "--marker", marker, "--temp-dir", f"{state}/"], env, 60)
    return [int(p) for p in out.stdout.split()]


@dataclass
class Head:
    state: Path                # DISTNMT_RAY_STATE of the test's cluster
    env: dict[str, str]        # environment for the launch/ scripts
    api_env: dict[str, str]    # plus what a Ray client needs: job server URL, token auth
    gcs_address: str = ""      # the head's GCS (host:port)

    def job(self, expression: str, job_id: str) -> str:
        """``expression`` on JobSubmissionClient ``c`` in a fresh process (Ray reads the
        auth mode once per process, so the test's own process stays out of it)."""
        code = ("import os; from ray.job_submission import JobSubmissionClient as C; "
                f"c = C(os.environ['RAY_API_SERVER_ADDRESS']); job = {job_id!r}; print({expression})")
        out = _run([PYTHON, "-c", code], self.api_env, 60)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip()


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """A local head from launch/start-head.sh, stopped by launch/stop-head.sh afterwards.

    The state directory is short (/tmp/dnt-XXXX): Ray's socket paths live under it.
    """
    state = Path(tempfile.mkdtemp(prefix="dnt-", dir="/tmp")) / "s"
    env = _clean_env(state)
    marker = ""
    try:
        started = _run([str(LAUNCH / "start-head.sh"), "--num-cpus", "2"], env, 180)
        assert started.returncode == 0, started.stderr
        cluster = dict(line.split("=", 1) for line in (state / "cluster.env").read_text().splitlines())
        marker = cluster["DISTNMT_RAY_CLUSTER"]
        # The job server (dashboard) is on loopback only; the token is private.
        assert cluster["DASHBOARD_URL"].startswith("http://127.0.0.1:")
        assert (state / "auth_token").stat().st_mode & 0o077 == 0
        api_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state / "auth_token"),
                   "RAY_API_SERVER_ADDRESS": cluster["DASHBOARD_URL"]}
        yield Head(state, env, api_env, cluster["GCS_ADDRESS"])
    finally:
        stopped = _run([str(LAUNCH / "stop-head.sh")], env, 120)
        left = _cluster_pids(state, marker, env) if marker else []
        shutil.rmtree(state.parent, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stderr
        assert left == [], f"processes of the test's Ray cluster still alive: {left}"


def test_stop_a_running_job(head: Head, prepared: Path, tmp_path: Path) -> None:
    submit = _run(
        [str(LAUNCH / "submit.sh"), "--no-wait", "--id", "dnt-job-2", "configs/quickstart.yaml",
         *_sets(TINY + ["train.max_steps=100000", "train.checkpoint_every=100000",
                        f"data.prepared_dir={prepared}", f"train.storage_path={tmp_path}", "train.name=long"])],
        head.env, 120,
    )
    assert submit.returncode == 0, submit.stderr[-2000:]

    def status() -> str:
        return head.job("c.get_job_status(job).value", "dnt-job-2")

    deadline = time.time() + 60
    while status() != "RUNNING" and time.time() < deadline:
        time.sleep(1)
    assert status() == "RUNNING"
    stop = _run([str(LAUNCH / "stop-job.sh"), "dnt-job-2"], head.env, 90)
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert status() == "STOPPED"
    # logs.sh says so with a non-zero exit.
    assert _run([str(LAUNCH / "logs.sh"), "dnt-job-2"], head.env, 60).returncode != 0


def test_cluster_job_entrypoint_prepares_to_shared_storage_then_trains(head: Head, tmp_path: Path) -> None:
    """The KubeRay RayJob's entrypoint (launch/cluster-job.sh), sent with the plain ray
    CLI as a user would after `eval "$(launch/ray-env.sh)"`."""
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    (shared / "data" / "wmt14-en-fr").symlink_to(SHARED)  # raw data "copied" to shared storage
    exports = _run([str(LAUNCH / "ray-env.sh")], head.env, 60)
    assert exports.returncode == 0, exports.stderr
    env = dict(head.env)
    for line in exports.stdout.splitlines():
        name, value = line.removeprefix("export ").split("=", 1)
        env[name] = value
    runtime_env = {"env_vars": {"DISTNMT_SHARED": str(shared), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"},
                   "excludes": ["/.git", "/.venv", "/prepared", "/runs"]}
    ray_cli = str(Path(PYTHON).parent / "ray") if PYTHON != "python3" else "ray"
    job = _run(
        [ray_cli, "job", "submit", "--submission-id", "dnt-job-3", "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "bash", "launch/cluster-job.sh", "configs/quickstart.yaml",
         *_sets(TINY + ["data.max_train_pairs=3000", "train.max_steps=20", "train.checkpoint_every=20",
                        "train.name=cj"])],
        env, 300,
    )
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-4000:]
    assert "Job 'dnt-job-3' succeeded" in output
    assert (shared / "prepared" / "quickstart" / "manifest.json").is_file()
    run_dir = shared / "runs" / "cj"
    assert (run_dir / "checkpoint_00000020").is_dir()
    assert [json.loads(line)["checkpoint"] for line in (run_dir / "eval" / "dev.jsonl").read_text().splitlines()] \
        == ["checkpoint_00000020"]

    # launch/logs.sh replays a finished job and exits 0 for SUCCEEDED.
    logs = _run([str(LAUNCH / "logs.sh"), "dnt-job-3"], head.env, 60)
    assert logs.returncode == 0, logs.stderr[-2000:]
    assert "checkpoint_00000020: BLEU|" in logs.stdout and "SUCCEEDED" in logs.stderr


# Ray Train's autoscaling client logs this with its traceback when a resource request
# times out on an overloaded CPU, and says it is safe to ignore when transient (its
# autoscaling_coordinator_client.py); two clusters on 2 cores can overload them. Any
# other traceback fails the test.
_OVERLOAD_NOTICE = re.compile(r"Failed to send resource request for train-.*?"
                              r"GetTimeoutError: Get timed out: some object\(s\) not ready\.", re.S)


def _without_overload_notice(text: str) -> str:
    return _OVERLOAD_NOTICE.sub("", text)


def test_submit_quickstart_beside_a_local_run(head: Head, prepared: Path, tiny_overrides: list[str],
                                              tmp_path: Path) -> None:
    """The quickstart config sent with launch/submit.sh (which follows the job to its end)
    while a quickstart-sized local `distnmt train` runs beside it: two clusters on one
    machine. One test for both runs, because each Ray run costs the suite tens of
    seconds of start-up.

    The job: its checkpoints and evaluator scores in the run directory it was told, the
    code uploaded without .git/.venv/data, a secret passed through without touching
    disk, and every placement group of its cluster released.

    The local run, on the cluster it starts itself: 2 Ray Train workers (gloo DDP) on the
    real WMT'14 sample while the evaluator actor scores every checkpoint with sacreBLEU,
    then `distnmt translate` from the last checkpoint alone. Seen as a user sees it
    (issue 18): what reaches the console (distnmt's lines, not Ray's informational ones,
    which go to the run's log file), which sockets its Ray processes listen on (loopback
    only), that each of them knows its own cluster's address (so Ray Train's
    placement-group cleaner, which asks the state API, finds it: no "multiple active Ray
    instances") and the run's Ray Train settings, and what its process tree costs in
    memory (PSS)."""
    state = head.state
    secret = "dnt-" + secrets.token_hex(12)
    env = {**head.env, "DISTNMT_TEST_SECRET": secret}
    storage = tmp_path / "runs"
    # One worker for the job: two clusters' workers, evaluators and controllers share 2 cores.
    job_args = [str(LAUNCH / "submit.sh"), "--env", "DISTNMT_TEST_SECRET", "--id", "dnt-job-1", "configs/quickstart.yaml",
                *_sets(TINY + ["train.workers=1", "train.max_steps=30", "train.checkpoint_every=15",
                               f"data.prepared_dir={prepared}", f"train.storage_path={storage}", "train.name=job"])]
    job_log = tmp_path / "submit.log"
    # The local run: the integration tests' tiny model, 2 workers; the job's cluster is
    # not its business (no DISTNMT_RAY_STATE).
    local_env = {k: v for k, v in head.env.items() if k not in {"DISTNMT_RAY_STATE"}}
    local_args = [PYTHON, "-m", "distnmt.cli", "train", "--config", "configs/quickstart.yaml",
                  *_sets([*tiny_overrides, "train.max_steps=150", "train.checkpoint_every=50", "eval.test_at_end=false",
                          "eval.figures=false", f"train.worker_start_timeout_s={START_TIMEOUT_S}",
                          f"train.storage_path={tmp_path}", "train.name=local"])]
    console_path = tmp_path / "console.txt"
    with open(job_log, "w") as out:
        submit = subprocess.Popen(job_args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with open(console_path, "w", encoding="utf-8") as out:
            local = subprocess.Popen(local_args, cwd=REPO, env=local_env, stdout=out, stderr=subprocess.STDOUT)
            seen = watch(local, timeout_s=400)
        submit.wait(timeout=300)
    finally:
        for proc in (submit, local):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    console = console_path.read_text(errors="replace")
    assert local.returncode == 0, console[-4000:]
    output = job_log.read_text(errors="replace")
    assert submit.returncode == 0, output[-4000:]
    for name, text in (("job", output), ("local run", console)):
        assert "multiple active Ray instances" not in text, f"{name}: {text[-4000:]}"
        assert "Traceback" not in _without_overload_notice(text), f"{name}: {text[-4000:]}"
    print(f"local run console: {len(console.splitlines())} lines; tree peak PSS {seen.peak_pss_mib:.0f} MiB")
    _check_local_console(console, tmp_path / "local")
    _check_local_processes(seen)
    _check_local_run_dir(tmp_path / "local")

    # The job, followed to its end by submit.sh: the driver's closing line.
    assert "Job 'dnt-job-1' succeeded" in output
    assert "newstest2013 checkpoint_00000030: BLEU|nrefs:1|" in output
    # Checkpoints and the evaluator's scores, in the run directory the job was told.
    run_dir = storage / "job"
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert checkpoints == ["checkpoint_00000015", "checkpoint_00000030"]
    scores = [json.loads(line) for line in (run_dir / "eval" / "dev.jsonl").read_text().splitlines()]
    assert sorted(r["checkpoint"] for r in scores) == checkpoints
    assert all(0.0 <= r["bleu"] <= 100.0 for r in scores)

    # What was uploaded: the code, without .git, .venv or data; distnmt/data/ kept.
    packages = list((state / "ray").glob("session_*/runtime_resources/working_dir_files/*/"))
    assert packages, "no working_dir package found on the head"
    uploaded = packages[0]
    assert (uploaded / "distnmt" / "data").is_dir() and (uploaded / "configs" / "quickstart.yaml").is_file()
    for left_out in (".git", ".venv", "data", "prepared", "runs", "bench-results"):
        assert not (uploaded / left_out).exists(), left_out

    # The secret reached the job's runtime_env, and no file of the cluster holds it.
    passed = head.job("c.get_job_info(job).runtime_env['env_vars'].get('DISTNMT_TEST_SECRET')", "dnt-job-1")
    assert passed == secret
    leaks = subprocess.run(["grep", "-rl", secret, str(state), str(storage)], capture_output=True, text=True)
    assert leaks.stdout == "", f"secret written to disk: {leaks.stdout}"

    # The state API of the job's cluster, asked from outside: no placement group left.
    code = ("from ray.util.state import list_placement_groups; "
            "print(sorted({str(g.state) for g in list_placement_groups(detail=True)}))")
    groups = _run([PYTHON, "-c", code], {**head.api_env, "RAY_ADDRESS": head.gcs_address}, 60)
    assert groups.returncode == 0, groups.stderr[-2000:]
    assert groups.stdout.strip() in ("['REMOVED']", "[]"), groups.stdout


# Ray Train's per-checkpoint chatter and Ray's start-up notice (issue 18's list).
RAY_INFO = ("Checkpoint successfully created", "Reporting training result", "Launched async validation task",
            "Running validations for checkpoint", "Staged validations for checkpoint", "Started a local Ray instance")
START_TIMEOUT_S = 45  # not Ray's default (60): seen in the workers' environment only if passed on


def _check_local_console(console: str, run_dir: Path) -> None:
    """distnmt's own lines reach the console; Ray's informational ones go to the run's log file."""
    assert "[distnmt] Ray ready" in console
    assert re.search(r"\[train\] step 10/150 .* tgt tok/s", console), console[-3000:]
    assert "[evaluator] newstest2013 checkpoint_00000050" in console
    assert "newstest2013 checkpoint_00000150: BLEU|nrefs:1|" in console.splitlines()[-1]
    for text in RAY_INFO:
        assert text not in console, text
    named = re.search(r"\[distnmt\] Ray's informational lines: (\S+)", console)
    assert named, console[:2000]
    ray_log = Path(named.group(1))
    assert ray_log.parent == run_dir / "logs"
    logged = ray_log.read_text(errors="replace")
    assert "Checkpoint successfully created" in logged and "Reporting training result" in logged


def _check_local_processes(seen: Watched) -> None:
    """Loopback only, and every Ray worker process told its own cluster and the run's settings."""
    # The GCS, raylet, object manager, dashboard and its agent, workers: all on loopback.
    assert len({port for _, _, port in seen.sockets}) >= 3, seen.sockets  # the run's Ray processes were seen
    outside = sorted((pid, seen.names.get(pid, "").strip(), address, port) for pid, address, port in seen.sockets
                     if not is_loopback(address))
    # None at all: rank 0's torch.distributed rendezvous (TCPStore, which would listen on
    # "::" by itself) serves on a socket distnmt binds to the node's address
    # (distnmt/cluster/process_group.py), and gloo's own sockets follow that address.
    assert outside == [], outside
    training = {pid for pid, name in seen.names.items() if name.startswith("ray::RayTrainWorker")}
    assert any(pid in training for pid, _, _ in seen.sockets), "no training worker's listening socket was seen"
    # Every Ray worker process of the run was told its own cluster's address ...
    assert seen.addresses, "no Ray worker process seen"
    assert len(set(seen.addresses.values())) == 1 and next(iter(seen.addresses.values())).startswith("127.0.0.1:"), \
        {pid: (seen.names.get(pid), address) for pid, address in seen.addresses.items()}
    # ... and the run's Ray Train settings (the controller reads this one; the driver is not it).
    assert set(seen.start_timeouts.values()) == {str(START_TIMEOUT_S)}, seen.start_timeouts


def _check_local_run_dir(run_dir: Path) -> None:
    """Every checkpoint scored while training went on, complete, and enough to translate."""
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert [p.name for p in checkpoints] == ["checkpoint_00000050", "checkpoint_00000100", "checkpoint_00000150"]
    persisted = [json.loads(line) for line in (run_dir / "eval" / "dev.jsonl").read_text().splitlines()]
    assert sorted(r["checkpoint"] for r in persisted) == [p.name for p in checkpoints]
    for record in persisted:
        assert record["sentences"] == 30  # TINY's eval.max_sentences
        assert 0.0 <= record["bleu"] <= 100.0
        assert record["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
        hyp = (run_dir / "eval" / f"dev.{record['checkpoint']}.hyp").read_text().splitlines()
        assert len(hyp) == 30
    # Concurrency: the first checkpoint was scored before training wrote its last one.
    first = min(persisted, key=lambda r: r["step"])
    assert first["scored_at"] < (checkpoints[-1] / "meta.json").stat().st_mtime

    # The checkpoint is complete: loads with checksums, holds the resume state.
    last = load_checkpoint(checkpoints[-1])
    assert last.step == 150
    assert {"model", "optimizer", "scheduler", "scaler", "sampler", "step", "epoch"} <= set(last.state)
    # Every rank's RNG state, merged by Ray from the workers' checkpoint directories.
    assert sorted(p.name for p in (checkpoints[-1] / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]

    # `distnmt translate` from that checkpoint alone: one output line per input line.
    lines = ["The house is small.", "", "Thank you very much for your attention."]
    out = subprocess.run(
        [PYTHON, "-m", "distnmt.cli", "translate", str(checkpoints[-1]), "--beam", "3", "--quiet"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == len(lines)
