"""ZeRO state re-sharded for another world size (distnmt/train/reshard.py), with real
DeepSpeed on CPU and real gloo process groups: a checkpoint written by 2 ranks is
converted and loaded by 1 rank, and one written by 1 rank by 2 ranks; every rank's
fp32 weights and Adam moments equal the matching slice of what was saved."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distnmt.train.engine import import_deepspeed
from distnmt.train.reshard import UNIVERSAL_DIR, remove_universal, universal_for

from ranks import free_port, start_ranks  # tests/ranks.py

pytestmark = pytest.mark.integration
TAG = "state"


def _engine(stage: int, world: int, universal: Path | None):
    deepspeed = import_deepspeed()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    if universal is not None:
        config["checkpoint"] = {"load_universal": True}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                   dist_init_required=False)
    return engine, optimizer


def _flat_state(optimizer) -> dict[str, torch.Tensor]:
    """This rank's partition: fp32 master weights and Adam's moments (one param group)."""
    inner = optimizer.optimizer
    param = inner.param_groups[0]["params"][0]
    state = inner.state[param]
    return {"fp32": param.detach().clone(), "exp_avg": state["exp_avg"].clone(), "exp_avg_sq": state["exp_avg_sq"].clone()}


def _worker(rank: int, world: int, port: int, mode: str, stage: int, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    checkpoint = Path(run_dir) / "checkpoint_00000003"
    try:
        if mode == "save":
            engine, optimizer = _engine(stage, world, None)
            for step in range(3):
                torch.manual_seed(100 + 10 * step + rank)
                loss = engine(torch.randn(8, 16)).pow(2).mean()
                engine.backward(loss)
                engine.step()
            engine.save_checkpoint(str(checkpoint / "deepspeed"), tag=TAG)
            torch.save(_flat_state(optimizer), checkpoint / f"saved-rank{rank}.pt")
            if rank == 0:
                (checkpoint / "meta.json").write_text(json.dumps({"world_size": world}))
        else:
            universal = universal_for(checkpoint, stage, world, Path(run_dir), rank,
                                      say=lambda _: None)
            assert universal is not None and (universal / TAG).is_dir()
            engine, optimizer = _engine(stage, world, universal)
            engine.load_checkpoint(str(universal), tag=TAG, load_optimizer_states=True)
            torch.save(_flat_state(optimizer), checkpoint / f"loaded-{world}-rank{rank}.pt")
            remove_universal(universal, rank)
    finally:
        dist.destroy_process_group()


def _run(world: int, mode: str, stage: int, run_dir: Path) -> None:
    start_ranks(_worker, (world, free_port(), mode, stage, str(run_dir)), world)


def _whole(parts: list[dict[str, torch.Tensor]], n: int) -> dict[str, torch.Tensor]:
    """Partitions concatenated in rank order, padding cut: the flat state of all ranks."""
    return {k: torch.cat([p[k] for p in parts])[:n] for k in parts[0]}


@pytest.mark.parametrize("stage, before, after", [(1, 2, 1), (2, 1, 2)])
def test_zero_state_reloads_exactly_on_another_world_size(stage: int, before: int, after: int, tmp_path: Path) -> None:
    _run(before, "save", stage, tmp_path)
    _run(after, "load", stage, tmp_path)
    checkpoint = tmp_path / "checkpoint_00000003"
    n = 16 * 33 + 33 + 33 * 5 + 5
    saved = _whole([torch.load(checkpoint / f"saved-rank{r}.pt") for r in range(before)], n)
    loaded = _whole([torch.load(checkpoint / f"loaded-{after}-rank{r}.pt") for r in range(after)], n)
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert float(saved["exp_avg_sq"].abs().sum()) > 0  # Adam really had state to carry over
    assert not (tmp_path / UNIVERSAL_DIR / checkpoint.name).exists()  # the converted copy is removed


def test_same_world_size_and_stage_zero_need_no_conversion(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint_00000003"
    checkpoint.mkdir()
    (checkpoint / "meta.json").write_text(json.dumps({"world_size": 2}))
    assert universal_for(checkpoint, 1, 2, tmp_path, 0) is None
    assert universal_for(checkpoint, 0, 1, tmp_path, 0) is None
    with pytest.raises(RuntimeError, match="written by 2 ZeRO-3 rank.*resumed on 1.*ZeRO-1 and ZeRO-2 only"):
        universal_for(checkpoint, 3, 1, tmp_path, 0)
