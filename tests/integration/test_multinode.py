"""Training across two Ray nodes on this machine: a head from launch/start-head.sh
and a second node joined with launch/add-node.sh (its own raylet, object store and
temp dir), one CPU each. A worker asks 0.8 CPU, so two cannot share a node: Ray
must place one worker on each, and DDP's gloo group spans both raylets. The
driver joins the cluster by address (`distnmt train --address`), as on a real
cluster; checkpoints and evaluator scores land in one storage path. The Ray
state API then shows which node each worker ran on. Both nodes are stopped by
process id in teardown, and none of their processes may be left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from distnmt.data.prepare import prepare

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SHARED = REPO.parent / "shared" / "data" / "wmt14-en-fr"
PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else "python3"
TINY = [
    "model.embed_size=32", "model.hidden_size=48", "model.align_size=48", "model.maxout_size=32",
    "data.max_len=30", "data.max_tokens=600", "data.vocab_size=800",
    "optim.name=adam", "optim.lr=0.003", "train.precision=fp32",
    "eval.beam_size=1", "eval.max_sentences=10", "eval.batch_sentences=10", "logging.log_every=10",
    # Two workers of 0.8 CPU on two 1-CPU nodes: one per node; the evaluator's 0.2 fits beside one.
    "train.workers=2", "train.cpus_per_worker=0.8", "eval.num_cpus=0.2",
    "train.max_steps=30", "train.checkpoint_every=15",
]


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def two_nodes() -> Iterator[tuple[Path, dict[str, str]]]:
    """Head (1 CPU) + one more node (1 CPU); yields the state dir and the env a driver needs."""
    state = Path(tempfile.mkdtemp(prefix="dnt-", dir="/tmp")) / "s"  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items()
           if k not in {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}}
    env.update(DISTNMT_RAY_STATE=str(state), WANDB_MODE="offline", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    marker = ""
    try:
        head = _run([str(LAUNCH / "start-head.sh"), "--num-cpus", "1"], env, 180)
        assert head.returncode == 0, head.stderr
        marker = dict(l.split("=", 1) for l in (state / "cluster.env").read_text().splitlines())["DISTNMT_RAY_CLUSTER"]
        node = _run([str(LAUNCH / "add-node.sh"), "--num-cpus", "1"], env, 180)
        assert node.returncode == 0, node.stderr
        # What `eval "$(launch/ray-env.sh)"` gives a user's shell: address and token auth.
        exports = _run([str(LAUNCH / "ray-env.sh")], env, 60)
        assert exports.returncode == 0, exports.stderr
        driver_env = dict(env)
        for line in exports.stdout.splitlines():
            name, value = line.removeprefix("export ").split("=", 1)
            driver_env[name] = value
        yield state, driver_env
    finally:
        stopped = _run([str(LAUNCH / "stop-head.sh")], env, 120)
        left = _run([PYTHON, str(LAUNCH / "localray.py"), "pids", "--marker", marker, "--temp-dir", f"{state}/"],
                    env, 60).stdout.split() if marker else []
        shutil.rmtree(state.parent, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stderr
        assert left == [], f"processes of the test's Ray nodes still alive: {left}"


def test_workers_on_both_nodes(two_nodes: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    state, env = two_nodes
    prepared = tmp_path / "prepared"
    prepare(SHARED, prepared, vocab_size=800, max_len=30, max_train_pairs=3000, progress=False)
    overrides = TINY + [f"data.prepared_dir={prepared}", f"train.storage_path={tmp_path / 'runs'}", "train.name=mn"]
    train = _run(
        [PYTHON, "-m", "distnmt.cli", "train", "--address", env["RAY_ADDRESS"],
         *[arg for item in overrides for arg in ("--set", item)]],
        env, 300,
    )
    output = train.stdout + train.stderr
    assert train.returncode == 0, output[-4000:]
    assert "checkpoint_00000030: BLEU|nrefs:1|" in output

    run_dir = tmp_path / "runs" / "mn"
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert checkpoints == ["checkpoint_00000015", "checkpoint_00000030"]
    scores = [json.loads(line) for line in (run_dir / "eval" / "dev.jsonl").read_text().splitlines()]
    assert sorted(r["checkpoint"] for r in scores) == checkpoints

    # Where the workers ran: the state API keeps finished actors with their node.
    code = (
        "import json, os; from ray.util.state import list_actors, list_nodes\n"
        "a = os.environ['RAY_API_SERVER_ADDRESS']\n"
        "workers = list_actors(address=a, filters=[('class_name', '=', 'RayTrainWorker')], detail=True)\n"
        "nodes = list_nodes(address=a, filters=[('state', '=', 'ALIVE')])\n"
        "print(json.dumps({'workers': [w.node_id for w in workers], 'nodes': [n.node_id for n in nodes]}))"
    )
    placed = _run([PYTHON, "-c", code], env, 60)
    assert placed.returncode == 0, placed.stderr[-2000:]
    where = json.loads(placed.stdout.strip().splitlines()[-1])
    assert len(where["nodes"]) == 2
    assert len(where["workers"]) == 2
    assert set(where["workers"]) == set(where["nodes"]), where
