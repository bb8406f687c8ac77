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
from pathlib import Path

import pytest


pytestmark = pytest.mark.integration

TINY = [
    "model.embed_size=32", "model.hidden_size=48", "model.align_size=48", "model.maxout_size=32",
    "data.max_len=30", "data.max_tokens=600", "data.vocab_size=800",
    "optim.name=adam", "optim.lr=0.003", "train.precision=fp32",
    "eval.beam_size=1", "eval.max_sentences=10", "eval.batch_sentences=10", "logging.log_every=10",
    # Two workers of 0.8 CPU on two 1-CPU nodes: one per node; the evaluator's 0.2 fits beside one.
    "train.workers=2", "train.cpus_per_worker=0.8", "eval.num_cpus=0.2",
    "train.max_steps=30", "train.checkpoint_every=15",
]


def test_workers_on_both_nodes(two_nodes, prepared: Path, tmp_path: Path) -> None:
    env = two_nodes.env
    overrides = TINY + [f"data.prepared_dir={prepared}", f"train.storage_path={tmp_path / 'runs'}", "train.name=mn"]
    train = two_nodes.run(
        [two_nodes.python, "-m", "distnmt.cli", "train", "--address", env["RAY_ADDRESS"],
         *[arg for item in overrides for arg in ("--set", item)]],
        300,
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
    placed = two_nodes.run([two_nodes.python, "-c", code], 60)
    assert placed.returncode == 0, placed.stderr[-2000:]
    where = json.loads(placed.stdout.strip().splitlines()[-1])
    assert len(where["nodes"]) == 2
    assert len(where["workers"]) == 2
    assert set(where["workers"]) == set(where["nodes"]), where
