"""Fixtures of the integration tests: real prepared data (small) and tiny-model overrides."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from distnmt.config import Config, DataConfig, load_config
from distnmt.data.prepare import prepare

# Ray Train's controller polls its workers every 2 s by default; a tiny run lasts
# seconds, so every test's Ray processes (they inherit this) poll every 0.2 s: reports
# and validations are picked up at once, and the suite spends less time waiting.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# A raylet ends a worker process that has been idle 1 s once the node runs more workers
# than it has CPUs, as a Ray Train run always does: each checkpoint's validation task
# (distnmt.evaluate.hook) then starts a new process (about 4 CPU-seconds of imports).
# The local clusters distnmt starts keep idle workers 2 min (cluster/run.py, start_local);
# this does the same for the clusters of `ray start` (launch/start-head.sh, add-node.sh)
# in test_elastic (3 such processes instead of 8, 12 CPU-s instead of 32) and test_job_submit.
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "120000")
# Ray Train's preemption watcher is an actor per worker group (about 2 CPU-seconds to
# start); without it ray.train.get_preemption_info() answers None, as it does with it
# while no node is drained. Only test_elastic drains a node: it turns the watcher on.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else "python3"

# A model small enough that a 2-worker Ray run takes seconds per hundred steps.
TINY = [
    "model.embed_size=32", "model.hidden_size=48", "model.align_size=48", "model.maxout_size=32",
    "data.max_len=30", "data.max_tokens=600", "data.vocab_size=800",
    "optim.name=adam", "optim.lr=0.003",
    "train.workers=2", "train.precision=fp32",
    "eval.beam_size=2", "eval.max_sentences=30", "eval.batch_sentences=30",
    "logging.log_every=10",
]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """3000 real WMT'14 training pairs, 800-subword vocabularies, dev/test in full."""
    out = tmp_path_factory.mktemp("prepared")
    prepare(DataConfig(source_dir=str(shared_data), prepared_dir=str(out), vocab_size=800, max_len=30, max_train_pairs=3000), progress=False)
    return out


@pytest.fixture
def tiny_overrides(prepared: Path) -> list[str]:
    """TINY as ``--set`` items for a ``distnmt train`` subprocess, on ``prepared``."""
    return [*TINY, f"data.prepared_dir={prepared}"]


@pytest.fixture
def tiny_config(prepared: Path) -> Callable[..., Config]:
    """``tiny_config(storage, name, *overrides)``: the tiny config on ``prepared``, run dir storage/name."""

    def make(storage: Path, name: str, *overrides: str) -> Config:
        return load_config(None, [*TINY, f"data.prepared_dir={prepared}", f"train.storage_path={storage}",
                                  f"train.name={name}", *overrides])

    return make


def run_command(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@dataclasses.dataclass
class RayNodes:
    """A local multi-node Ray cluster of launch/start-head.sh + add-node.sh."""

    state: Path             # DISTNMT_RAY_STATE: cluster.env, node-N temp dirs
    env: dict[str, str]     # what a driver needs: RAY_ADDRESS, the API server, token auth
    python: str = PYTHON

    def run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return run_command(args, self.env, timeout)


@pytest.fixture
def two_nodes() -> Iterator[RayNodes]:
    """Head (1 CPU) + one more node (1 CPU), stopped by process id afterwards."""
    state = Path(tempfile.mkdtemp(prefix="dnt-", dir="/tmp")) / "s"  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items()
           if k not in {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}}
    env.update(DISTNMT_RAY_STATE=str(state), WANDB_MODE="offline", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    marker = ""
    try:
        head = run_command([str(LAUNCH / "start-head.sh"), "--num-cpus", "1"], env, 180)
        assert head.returncode == 0, head.stderr
        marker = dict(l.split("=", 1) for l in (state / "cluster.env").read_text().splitlines())["DISTNMT_RAY_CLUSTER"]
        node = run_command([str(LAUNCH / "add-node.sh"), "--num-cpus", "1"], env, 180)
        assert node.returncode == 0, node.stderr
        # What `eval "$(launch/ray-env.sh)"` gives a user's shell: address and token auth.
        exports = run_command([str(LAUNCH / "ray-env.sh")], env, 60)
        assert exports.returncode == 0, exports.stderr
        driver_env = dict(env)
        for line in exports.stdout.splitlines():
            name, value = line.removeprefix("export ").split("=", 1)
            driver_env[name] = value
        yield RayNodes(state, driver_env)
    finally:
        stopped = run_command([str(LAUNCH / "stop-head.sh")], env, 120)
        left = run_command([PYTHON, "-m", "distnmt.cli", "cluster", "pids", "--marker", marker, "--temp-dir",
                            f"{state}/"], env, 60).stdout.split() if marker else []
        shutil.rmtree(state.parent, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stderr
        assert left == [], f"processes of the test's Ray nodes still alive: {left}"
