"""The Trainer in one process, without a Ray cluster: exact resume, the stop and
checkpoint policies, the non-finite streak (DDP and DeepSpeed), the time budget,
a killed writer's leftovers, and ``train.workers: 0`` (Ray Train's local mode)
through the real ``distnmt train`` path. What only a cluster can show (worker
loss, elastic resizing, the evaluator actor, ``ray job submit``) is in
tests/integration/."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch
import torch.distributed as dist

from distnmt.checkpoint import list_checkpoints, load_checkpoint, nonfinite_path, rng_path
from distnmt.config import Config, DataConfig, load_config
from distnmt.data.prepare import prepare
from distnmt.train.session import Session
from distnmt.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.embed_size=16", "model.hidden_size=24", "model.align_size=24", "model.maxout_size=16",
        "data.max_len=30", "data.max_tokens=300", "data.vocab_size=800", "optim.name=adam", "optim.lr=0.003",
        "train.workers=1", "train.precision=fp32", "logging.log_every=4", "logging.wandb=disabled"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(DataConfig(source_dir=str(shared_data), prepared_dir=str(out), vocab_size=800, max_len=30, max_train_pairs=1000), progress=False)
    return out


def _cfg(prepared: Path, run_dir: Path, *overrides: str) -> Config:
    return load_config(None, [*TINY, f"data.prepared_dir={prepared}", f"train.storage_path={run_dir.parent}",
                              f"train.name={run_dir.name}", *overrides])


def _steps(run_dir: Path) -> list[int]:
    return [int(load_checkpoint(p).meta["step"]) for p in list_checkpoints(run_dir)]


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A real gloo process group of one rank (DeepSpeed initializes on an existing group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
            os.environ.pop(key, None)


def test_a_resumed_run_equals_an_uninterrupted_one(prepared: Path, tmp_path: Path) -> None:
    """Weights, optimizer, schedule, sampler, RNG and the batches trained: a run resumed from
    step 5 ends at step 12 exactly as the run that never stopped, across an epoch boundary,
    with dropout (so the RNG states matter) and accumulation (so the sampler's position does)."""
    common = ["train.max_steps=12", "train.checkpoint_every=5", "model.dropout=0.2", "train.accumulate=2",
              "optim.schedule=inverse_sqrt", "optim.warmup_steps=3", "train.log_batches=true"]
    straight = tmp_path / "straight"
    assert Trainer(_cfg(prepared, straight, *common), straight, Session(straight)).fit() == "train.max_steps=12 reached"
    assert _steps(straight) == [5, 10, 12]

    # The same run, stopped after its checkpoint at step 5: resumed by a new Trainer.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(straight / "checkpoint_00000005", stopped / "checkpoint_00000005")
    trainer = Trainer(_cfg(prepared, stopped, *common), stopped, Session(stopped))
    assert trainer.resumed_from == stopped / "checkpoint_00000005" and trainer.step == 5
    trainer.fit()

    a = load_checkpoint(straight / "checkpoint_00000012").state
    b = load_checkpoint(stopped / "checkpoint_00000012").state
    assert a["epoch"] == b["epoch"] >= 1  # an epoch boundary was crossed after the resume
    assert a["sampler"] == b["sampler"] and a["step"] == b["step"] == 12
    for part in ("model", "scheduler", "scaler"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert (torch.equal(a[part][key], b[part][key]) if isinstance(a[part][key], torch.Tensor)
                    else a[part][key] == b[part][key]), (part, key)
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
    rng_a = torch.load(rng_path(straight / "checkpoint_00000012", 0), weights_only=True)
    rng_b = torch.load(rng_path(stopped / "checkpoint_00000012", 0), weights_only=True)
    assert torch.equal(rng_a["torch"], rng_b["torch"]) and torch.equal(rng_a["numpy"]["keys"], rng_b["numpy"]["keys"])
    # Every batch after step 5 the same, in the same order ('step epoch ids...' per batch).
    after = [line for line in (straight / "batches/rank0.log").read_text().splitlines() if int(line.split()[0]) > 5]
    assert (stopped / "batches/rank0.log").read_text().splitlines() == after
    # The resumed part did train (equality is not vacuous).
    mid = load_checkpoint(straight / "checkpoint_00000005").state["model"]
    assert any(not torch.equal(mid[k], b["model"][k]) for k in mid)


def test_a_resumed_run_continues_its_wandb_run(prepared: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "logged"
    common = ["train.checkpoint_every=3", "logging.wandb=offline"]
    Trainer(_cfg(prepared, run_dir, "train.max_steps=3", *common), run_dir, Session(run_dir)).fit()
    Trainer(_cfg(prepared, run_dir, "train.max_steps=6", *common), run_dir, Session(run_dir)).fit()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    # offline-run-<date>_<time>-<id>, with "-1" appended by wandb when both runs start in the same second
    ids = {re.match(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)", p.name).group(1) for p in runs}
    assert len(runs) == 2 and len(ids) == 1, runs  # one run id
    assert load_checkpoint(run_dir / "checkpoint_00000006").meta["wandb_run_id"] == ids.pop()


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_a_loss_that_stays_nan_stops_with_the_last_good_checkpoint(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str, request: pytest.FixtureRequest,
) -> None:
    """Step 4 alone is NaN (skipped; training goes on), then every step from 9 on: the run stops
    at step 11 with nonfinite.json, and checkpoint 5 (after the skipped step) is the last one."""
    monkeypatch.setenv("DISTNMT_FAULT_NAN", "4,9-")
    extra = []
    if engine == "deepspeed":
        request.getfixturevalue("one_rank_group")
        extra = ["train.backend=deepspeed", f"train.deepspeed_config={REPO}/configs/deepspeed/zero2.json"]
    run_dir = tmp_path / engine
    cfg = _cfg(prepared, run_dir, "train.max_steps=30", "train.checkpoint_every=5", "train.max_nonfinite_steps=3",
               *extra)
    assert Trainer(cfg, run_dir, Session(run_dir)).fit() == "non-finite loss"
    assert _steps(run_dir) == [5]  # at step 10, in the streak, no checkpoint
    assert load_checkpoint(run_dir / "checkpoint_00000005").meta["world_size"] == 1
    weights = load_checkpoint(run_dir / "checkpoint_00000005").state["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())
    import json

    assert json.loads(nonfinite_path(run_dir).read_text())["message"].startswith(
        "training stopped at step 11: loss or gradients non-finite for 3 consecutive steps")


def test_the_time_budget_checkpoints_and_stops(prepared: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "timed"
    cfg = _cfg(prepared, run_dir, "train.max_steps=1000", "train.checkpoint_every=500", "train.max_minutes=0.0001")
    assert Trainer(cfg, run_dir, Session(run_dir)).fit() == "train.max_minutes=0.0001 spent"
    assert _steps(run_dir) == [1]  # 6 ms is spent by the first step: checkpointed, as at max_steps


def test_the_last_epoch_ends_the_run_with_a_checkpoint(prepared: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "epochs"
    cfg = _cfg(prepared, run_dir, "train.max_steps=1000", "train.checkpoint_every=100", "train.max_epochs=1")
    trainer = Trainer(cfg, run_dir, Session(run_dir))
    steps = len(trainer.sampler)  # one batch per step
    assert trainer.fit() == "train.max_epochs=1 reached"
    assert _steps(run_dir) == [steps]
    assert load_checkpoint(run_dir / f"checkpoint_{steps:08d}").state["sampler"]["position"] == steps


class _Evaluator:
    """The evaluator's one answer the loop needs: stop after the second checkpoint it saw."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def stop_reason(self) -> Optional[str]:
        return "early stopping: no dev BLEU gain" if len(list_checkpoints(self.run_dir)) >= 2 else None


def test_early_stop_from_the_evaluator_is_asked_after_each_checkpoint(prepared: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "early"
    cfg = _cfg(prepared, run_dir, "train.max_steps=100", "train.checkpoint_every=3")
    session = Session(run_dir, stop_reason=_Evaluator(run_dir).stop_reason)
    assert Trainer(cfg, run_dir, session).fit() == "early stopping: no dev BLEU gain"
    assert _steps(run_dir) == [3, 6]


class _Drained(Session):
    """Ray's preemption info as a drained node gives it, from step 4 on."""

    trainer: Optional[Trainer] = None

    def preemption_notice(self) -> Optional[str]:
        return "preemption notice for rank(s) [0]" if self.trainer is not None and self.trainer.step >= 4 else None


def test_a_preemption_notice_checkpoints_at_once_and_once(prepared: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "preempted"
    cfg = _cfg(prepared, run_dir, "train.max_steps=10", "train.checkpoint_every=100", "train.preemption_check_every=3")
    session = _Drained(run_dir)
    trainer = session.trainer = Trainer(cfg, run_dir, session)
    trainer.fit()
    assert _steps(run_dir) == [6, 10]  # asked at 3 (no notice), 6 (notice: checkpoint), not again; 10 = last


def test_a_killed_writers_hidden_directory_is_cleared_at_start(prepared: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    leftovers = [run_dir / ".checkpoint_00000040.x1y2", run_dir / ".checkpoint_00000002.staging",
                 run_dir / "..checkpoint_00000002.staging.abc"]
    for path in leftovers:
        (path / "rng").mkdir(parents=True)
        (path / "state.pt").write_bytes(b"half")
    (run_dir / ".keep").mkdir()  # not a checkpoint writer's: left alone
    Trainer(_cfg(prepared, run_dir, "train.max_steps=2", "train.checkpoint_every=2"), run_dir, Session(run_dir)).fit()
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == [".keep"]
    assert "removed .checkpoint_00000040.x1y2, a checkpoint a killed writer left unfinished" in capsys.readouterr().out
    assert _steps(run_dir) == [2]


def test_state_dict_round_trip(prepared: Path, tmp_path: Path) -> None:
    """load_state_dict(state_dict()) into a fresh Trainer gives back the same state."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    a = Trainer(_cfg(prepared, run_a, "train.max_steps=3", "train.checkpoint_every=100", "train.accumulate=2"),
                run_a, Session(run_a))
    a.fit()
    state = a.state_dict()
    b = Trainer(_cfg(prepared, run_b, "train.max_steps=3", "train.accumulate=2"), run_b, Session(run_b))
    b.load_state_dict(state)
    again = b.state_dict()
    assert (again["step"], again["epoch"], again["sampler"]) == (3, state["epoch"], state["sampler"])
    assert again["sampler"]["position"] == 6  # 3 steps of 2 micro-batches, none of the one fetched ahead
    for part in ("model", "scheduler"):
        for key, value in state[part].items():
            assert (torch.equal(value, again[part][key]) if isinstance(value, torch.Tensor)
                    else value == again[part][key]), (part, key)
    assert torch.equal(state["rng"]["torch"], again["rng"]["torch"])
    assert state["rng"]["numpy"]["pos"] == again["rng"]["numpy"]["pos"]


def test_workers_0_trains_in_this_process_with_ray_train_local_mode(prepared: Path, tmp_path: Path,
                                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """`distnmt train` with train.workers=0: no Ray cluster, the loop in this process through
    Ray Train's local mode, the checkpoints scored after training, Ray Train's informational
    lines in the run's Ray log and not on the console (as in a cluster run); and a NaN
    streak ends it with the driver's one-line error naming the last good checkpoint."""
    import ray

    from distnmt.cli import main

    args = ["train"]
    for text in [*TINY, f"data.prepared_dir={prepared}", f"train.storage_path={tmp_path}", "train.name=local",
                 "train.workers=0", "train.max_steps=6", "train.checkpoint_every=3", "eval.max_sentences=4",
                 "eval.beam_size=1", "eval.test_at_end=false", "eval.figures=false"]:
        args += ["--set", text]
    assert main(args) == 0
    out, err = capfd.readouterr()  # fd-level: Ray's logging handler holds the real stderr
    assert not ray.is_initialized()  # no cluster was started
    ray_logs = "".join(p.read_text() for p in (tmp_path / "local/logs").glob("ray-*.log"))
    assert "Running in local mode" in ray_logs and "Running in local mode" not in out + err
    assert "Ray's informational lines: " in out
    assert f"[train] ddp on 1 worker(s) (cpu)" in out and "[train] stopping at step 6" in out
    assert "checkpoint_00000006: BLEU|" in out  # scored by the evaluator's class, in this process
    assert _steps(tmp_path / "local") == [3, 6]

    os.environ["DISTNMT_FAULT_NAN"] = "8-"
    try:
        assert main([*args, "--set", "train.max_steps=20", "--set", "train.max_nonfinite_steps=2"]) == 1
    finally:
        del os.environ["DISTNMT_FAULT_NAN"]
    err = capfd.readouterr().err
    assert ("training stopped at step 9: loss or gradients non-finite for 2 consecutive steps "
            "(train.max_nonfinite_steps=2); try a lower optim.lr or bf16 instead of fp16; "
            f"last good checkpoint: {tmp_path / 'local/checkpoint_00000006'}") in err
