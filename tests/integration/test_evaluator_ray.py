"""Real 2-worker Ray Train runs (gloo DDP) with the evaluator actor, on this 2-CPU
machine: a training worker SIGKILLed mid-epoch is replaced with nothing lost, and the
evaluator killed mid-decode loses no checkpoint's score (both in one run: each Ray run
costs the suite about a minute); early stopping ends a run; under policy "newest"
every checkpoint is scored or recorded as skipped; the end-of-run work (test score of
the best checkpoint, the paper's figures) is done.

Exact resume is tested in one process on the Trainer itself (tests/test_trainer.py);
DeepSpeed worker kills with real processes are in test_elastic.py and
test_reliability_ray.py. (That the evaluator scores while training goes on is the
local run of tests/integration/test_job_submit.py.)"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import ray

from distnmt.config import Config, load_config
from distnmt.data.sampler import BucketBatchSampler
from distnmt.data.shards import TokenArray
from distnmt.evaluate.score import SLOWDOWN_ENV

pytestmark = [pytest.mark.integration, pytest.mark.ray]

NAMESPACE = "distnmt"  # distnmt.orchestrate.NAMESPACE (not imported: collecting must not need train/)
TINY = [
    "model.embed_size=32", "model.hidden_size=48", "model.align_size=48", "model.maxout_size=32",
    "data.max_len=30", "data.max_tokens=600", "data.vocab_size=800",
    "optim.name=adam", "optim.lr=0.003",
    "train.workers=2", "train.precision=fp32",
    "eval.beam_size=2", "eval.batch_sentences=50", "eval.attention_examples=2",
    "logging.log_every=10",
]


KILL_STEP = 60  # rank 1 is SIGKILLed as it starts this step (after checkpoint 50)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One local cluster for the module (the driver joins it instead of starting its own).

    The cluster's processes inherit the test's environment: Ray Train's controller
    polls every 2 s by default, long next to these tiny runs; and the tiny models
    decode in a blink, so each decode is made to last 2 s (SLOWDOWN_ENV) for the
    evaluator to fall behind training and to be caught mid-decode. The workers also
    get the worker fault (DISTNMT_FAULT_KILL), disarmed: its marker file exists.
    Yields the marker; a test that deletes it arms the fault for its run.
    """
    marker = tmp_path_factory.mktemp("fault") / "worker-killed"
    marker.write_text("disarmed\n")
    settings = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", SLOWDOWN_ENV: "2",
                "DISTNMT_FAULT_KILL": f"1:{KILL_STEP}:{marker}"}
    previous = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    from distnmt.cluster import start_local

    local_ray = start_local()  # loopback, as every local cluster distnmt starts
    yield marker
    local_ray.stop()
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _config(prepared: Path, storage: Path, name: str, overrides: list[str]) -> Config:
    return load_config(None, TINY + overrides + [
        f"data.prepared_dir={prepared}", f"train.storage_path={storage}", f"train.name={name}",
    ])


def _train(cfg: Config) -> list[dict[str, Any]]:
    from distnmt.orchestrate import run_training

    try:
        return run_training(cfg)
    finally:
        _release_evaluator(cfg.train.name)


def _evaluator(name: str) -> Any:
    """The run's evaluator actor (the driver names it distnmt-evaluator-<train.name>-<run dir digest>)."""
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(f"distnmt-evaluator-{name}-"):
            return ray.get_actor(entry["name"], namespace=NAMESPACE)
    raise ValueError(f"no evaluator actor for run {name!r} (yet)")


def _release_evaluator(name: str) -> None:
    """Free the actor's CPU for the next run if it outlived run_training on the test's cluster."""
    try:
        ray.kill(_evaluator(name), no_restart=True)
    except ValueError:
        pass  # gone already (the driver kills it at the end) or never started


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint_*") if (p / "meta.json").is_file())


class _Killer(threading.Thread):
    """Kills the evaluator actor (Ray restarts it) the first time it is caught decoding.

    The deadline is only a backstop (the test stops the thread when training ends):
    on a loaded 2-core machine the first decode can start minutes in.
    """

    def __init__(self, name: str, deadline_s: float = 900.0) -> None:
        super().__init__(daemon=True)
        self.name_ = name
        self.deadline = time.time() + deadline_s
        self.killed: Optional[dict[str, Any]] = None
        self.errors: list[str] = []  # why polls failed, for the assertion message
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and time.time() < self.deadline:
            try:
                actor = _evaluator(self.name_)
                status = ray.get(actor.status.remote(), timeout=10)
            except Exception as err:  # not started yet, or restarting: poll again
                self.errors.append(f"{type(err).__name__}: {str(err)[:200]}")
                time.sleep(0.2)
                continue
            if status["decoding"]:
                ray.kill(actor, no_restart=False)
                self.killed = status
                return
            # A decode lasts at least SLOWDOWN_ENV's 2 s: 4 looks a second catch it, and
            # cost the actor and the test's process far less than 20 did.
            time.sleep(0.25)


def _epoch_batches(prepared: Path, epoch: int, world: int, cfg: Config) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Each rank's batches of one epoch as the trainers' samplers cut them, and the dropped ones."""
    src, tgt = TokenArray(prepared / "train.en"), TokenArray(prepared / "train.fr")
    per_rank, dropped = [], []
    for rank in range(world):
        sampler = BucketBatchSampler(src.lengths, tgt.lengths, cfg.data.max_tokens, num_replicas=world, rank=rank,
                                     seed=cfg.train.seed)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
        dropped = sampler.dropped_batches()
    return per_rank, dropped


def _check_every_pair_trained_once(prepared: Path, run_dir: Path, cfg: Config, redone: range) -> None:
    """The batch logs ('step epoch ids...' per batch, both attempts) against what the
    samplers cut: every batch of the run's steps once, those of ``redone`` (after the
    last checkpoint, before the kill) twice: redone, never skipped."""
    trained: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for rank in (0, 1):
        for line in (run_dir / f"batches/rank{rank}.log").read_text().splitlines():
            _step, epoch, *ids = map(int, line.split())
            trained[epoch].update(ids)
    want: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    step, epoch = 0, 0
    while step < cfg.train.max_steps:
        per_rank, dropped = _epoch_batches(prepared, epoch, 2, cfg)
        if epoch == 0:
            dropped_in_epoch_0 = {pair for batch in dropped for pair in batch}
        for i in range(min(len(per_rank[0]), cfg.train.max_steps - step)):
            step += 1
            for rank in (0, 1):
                want[epoch].update({pair: 2 if step in redone else 1 for pair in per_rank[rank][i]})
        epoch += 1
    assert trained == want
    # Epoch 0 ran to its end: every pair of the corpus was in it, apart from the
    # fewer-than-world batches dropped so ranks have equal counts.
    n_pairs = len(TokenArray(prepared / "train.en"))
    assert set(trained[0]) == set(range(n_pairs)) - dropped_in_epoch_0


def test_a_killed_worker_and_a_killed_evaluator_lose_nothing(local_ray: Path, prepared: Path, tmp_path: Path) -> None:
    """One run, two faults: rank 1 SIGKILLed as it starts step KILL_STEP (rank 0 then
    waits in that step's all-reduce): Ray replaces the worker group, which resumes from
    checkpoint 50 and redoes the steps since, skipping none; and the evaluator actor
    killed the first time it is caught decoding: Ray restarts it and no checkpoint's
    score is lost."""
    marker = local_ray
    cfg = _config(prepared, tmp_path, "kill", ["train.max_steps=100", "train.checkpoint_every=50",
                                               "eval.max_sentences=100", "train.max_failures=1", "train.log_batches=true"])
    killer = _Killer("kill")
    marker.unlink()  # arms the worker fault for this run
    killer.start()
    try:
        records = _train(cfg)
    finally:
        killer.stop.set()
        killer.join()
        if not marker.exists():
            marker.write_text("disarmed\n")  # the fault never fired: keep it out of the next test
    assert marker.read_text() == f"rank 1 killed at step {KILL_STEP}\n", "the worker fault was not injected"
    assert killer.killed is not None, f"the evaluator was never caught decoding; polls failed with {killer.errors[-3:]}"

    run_dir = tmp_path / "kill"
    checkpoints = _checkpoints(run_dir)
    assert checkpoints == ["checkpoint_00000050", "checkpoint_00000100"]
    persisted = [r for r in _lines(run_dir / "eval" / "dev.jsonl") if r["origin"] == "training"]
    # Every reported checkpoint has its score, exactly once, though one decode was cut short.
    assert sorted(r["checkpoint"] for r in persisted) == checkpoints
    assert sorted(r.checkpoint for r in records) == checkpoints
    # Each training score stores its lag (from the report in storage) and its dev cross-entropy.
    for record in persisted:
        assert record["lag_seconds"] == round(record["scored_at"] - record["reported_at"], 2) > 0
        assert record["xent"] > 0 and record["xent_tokens"] > record["sentences"]
    # The one being decoded when the actor died was scored by its successor.
    victim = next(r for r in persisted if r["checkpoint"] == killer.killed["decoding"])
    assert victim["evaluator_pid"] != killer.killed["pid"]

    # The end of the run: the best checkpoint on newstest2014, the paper's figures.
    final = json.loads((run_dir / "eval" / "final.json").read_text())
    best = max(persisted, key=lambda r: (r["bleu"], -r["step"]))
    assert final["best"]["checkpoint"] == best["checkpoint"]
    assert (final["test"]["test_set"], final["test"]["checkpoint"]) == ("newstest2014", best["checkpoint"])
    assert sorted(final["figures"]) == [
        "figures/attention_dev0001.png", "figures/attention_dev0003.png", "figures/bleu_by_length.png",
    ]
    for name in final["figures"]:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert final["lag_seconds"]["checkpoints"] == 2

    # The worker kill: nothing lost, the steps after checkpoint 50 redone, none skipped.
    _check_every_pair_trained_once(prepared, run_dir, cfg, redone=range(51, KILL_STEP))


def test_early_stopping_ends_the_run_and_newest_policy_skips_with_a_record(
    local_ray: Path, prepared: Path, tmp_path: Path
) -> None:
    # No checkpoint can beat the first by 100 BLEU: the run must stop after the second score.
    # Checkpoints every 10 steps and 2 s decodes: the evaluator falls behind.
    _train(_config(prepared, tmp_path, "early", [
        "train.max_steps=3000", "train.checkpoint_every=10", "eval.max_sentences=50",
        "eval.patience=1", "eval.min_delta=100", "eval.policy=newest", "eval.figures=false", "eval.test_at_end=false",
    ]))
    run_dir = tmp_path / "early"
    checkpoints = _checkpoints(run_dir)
    steps = [int(name.split("_")[1]) for name in checkpoints]
    assert max(steps) < 3000, "early stopping did not end the run"

    final = json.loads((run_dir / "eval" / "final.json").read_text())
    assert final["stop_reason"].startswith("early stopping: newstest2013 BLEU has not improved by more than 100")
    scored = [r["checkpoint"] for r in _lines(run_dir / "eval" / "dev.jsonl")]
    skipped = _lines(run_dir / "eval" / "dev.skipped.jsonl")
    # Every reported checkpoint was either scored or recorded as skipped, never both.
    assert sorted(scored + [r["checkpoint"] for r in skipped]) == checkpoints
    assert len(scored) >= 2 and checkpoints[-1] in scored  # the newest is always scored
    assert skipped, "the evaluator never fell behind"
    for record in skipped:
        assert record["newer"] > record["checkpoint"] and record["newer"] in checkpoints
