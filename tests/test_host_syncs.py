"""Host syncs per training step (issue 15): each one stalls a GPU until its queue drains.

Two real ranks (gloo) run the real entry point, ``train_loop_per_worker``, through Ray
Train's local mode in its torchrun form (each process its own rank, no cluster).
While they train, every call that reads a tensor on the host from distnmt's own code
(``Tensor.item``, ``.tolist``, ``.cpu``, ``bool()``, ``float()``, ``int()``) and every
explicit ``torch.distributed.all_reduce`` is counted, attributed to the distnmt file
that made it, per step (from one ``train_step`` to the next). On a CPU these calls cost
little; what is held here is their number, which is what a GPU pays for.

A plain step (no log line, no checkpoint) makes, from the loop (trainer.py, policies.py,
batches.py): exactly ONE all-reduce (the step's agreed facts) and ONE host read (its
result). What the engine makes (engine.py and the Batch token counts it calls) is
recorded too, and held to the count measured when this test was written, so that a
change adding one fails here.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from ranks import free_port, start_ranks  # tests/ranks.py

STEPS = 9
LOG_EVERY = 4  # steps 4 and 8 log; step 9 (the last) checkpoints: the plain steps are 1-3 and 5-7
PLAIN = [1, 2, 3, 5, 6, 7]
TINY = ["model.embed_size=16", "model.hidden_size=24", "model.align_size=24", "model.maxout_size=16",
        "data.max_len=30", "data.max_tokens=300", "data.vocab_size=800", "optim.name=adam", "optim.lr=0.003",
        "train.workers=2", "train.precision=fp32", "logging.wandb=disabled",
        "train.max_minutes=60"]  # a time budget (never spent here): its check is part of every step
READS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")


def _count(rank: int, port: int, prepared: str, run_dir: str, out: str) -> None:
    """One rank: train STEPS steps with every host read and all-reduce from distnmt counted per step."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WANDB_MODE="disabled")
    import torch
    import torch.distributed as dist
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from distnmt.config import load_config
    from distnmt.train import engine as engine_module
    from distnmt.train.loop import train_loop_per_worker

    torch.set_num_threads(1)
    package = str(Path(engine_module.__file__).resolve().parents[1])
    steps: list[collections.Counter] = [collections.Counter()]  # steps[k]: from train_step k to train_step k+1

    def caller() -> str:
        frame = sys._getframe(2)  # the frame that called the tensor method (C callers are skipped by Python)
        name = frame.f_code.co_filename
        return str(Path(name).relative_to(package)) if name.startswith(package) else ""

    def counting(kind: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            where = caller()
            if where:
                steps[-1][f"{kind} {where}"] += 1
            return original(*args, **kwargs)
        return wrapper

    for kind in READS:
        setattr(torch.Tensor, kind, counting(kind, getattr(torch.Tensor, kind)))
    dist.all_reduce = counting("all_reduce", dist.all_reduce)
    train_step = engine_module.DDPEngine.train_step

    def step_marker(self: Any, batches: Any) -> Any:
        steps.append(collections.Counter())
        return train_step(self, batches)

    engine_module.DDPEngine.train_step = step_marker
    cfg = load_config(None, [*TINY, f"data.prepared_dir={prepared}", f"train.max_steps={STEPS}",
                             f"train.checkpoint_every={STEPS}", f"logging.log_every={LOG_EVERY}"])
    loop_config = {"config": cfg.to_dict(), "run_dir": run_dir, "evaluator": None, "namespace": None, "local": False}
    TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=ScalingConfig(num_workers=0)).fit()
    Path(f"{out}.{rank}").write_text(json.dumps([dict(c) for c in steps]))


def count_syncs(prepared: Path, tmp_path: Path) -> list[list[dict[str, int]]]:
    """Per rank, per step (index 0: before the first step), {"<kind> <file>": calls}."""
    out = tmp_path / "syncs"
    start_ranks(_count, (free_port(), str(prepared), str(tmp_path / "run"), str(out)), 2)
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]


def per_plain_step(counts: list[list[dict[str, int]]]) -> dict[str, float]:
    """Mean calls per plain step, over the plain steps of both ranks."""
    total: collections.Counter = collections.Counter()
    for rank in counts:
        for step in PLAIN:
            total.update(rank[step])
    return {key: value / (2 * len(PLAIN)) for key, value in sorted(total.items())}


LOOP_FILES = ("train/trainer.py", "train/policies.py", "train/batches.py")
# What the rest made per plain step when this test was written (the engine of the gpu
# branch, one micro-batch per step, Adam without fused kernels on the CPU): engine.py's
# all-reduce of the step's token count and its one read, the skip decision of a
# non-fused optimizer (bool of the finite flag); model/rnnsearch.py's two int() of the
# source lengths, which stay on the host (packing needs them there): no device sync.
# Before the loop and engine changes (main at 1770b38, same counter, same run): loop.py
# 2 all-reduces + 2 reads (non-finite streak, time budget), engine.py 1 all-reduce +
# 3 reads, data/batch.py 2 and model/rnnsearch.py 2 int(): 3 all-reduces, 9 reads.
ENGINE_MAX = {"all_reduce": 1, "reads": 3}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    from distnmt.config import DataConfig
    from distnmt.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(DataConfig(source_dir=str(shared_data), prepared_dir=str(out), vocab_size=800, max_len=30, max_train_pairs=1000), progress=False)
    return out


def test_a_plain_step_makes_one_all_reduce_and_one_host_read_in_the_loop(prepared: Path, tmp_path: Path) -> None:
    counts = count_syncs(prepared, tmp_path)
    per_step = per_plain_step(counts)
    print(json.dumps(per_step, indent=1))  # shown with -s: the breakdown by file
    loop = {k: v for k, v in per_step.items() if k.split(" ", 1)[1] in LOOP_FILES}
    assert loop == {"all_reduce train/policies.py": 1.0, "tolist train/policies.py": 1.0}
    engine = {k: v for k, v in per_step.items() if k.split(" ", 1)[1] not in LOOP_FILES}
    assert sum(v for k, v in engine.items() if k.startswith("all_reduce")) <= ENGINE_MAX["all_reduce"]
    assert sum(v for k, v in engine.items() if not k.startswith("all_reduce")) <= ENGINE_MAX["reads"]
    # Logging steps read the meters (one all-reduce, one read) and no more from the loop.
    for rank in counts:
        logged = {k: v for k, v in rank[LOG_EVERY].items() if k.split(" ", 1)[1] in LOOP_FILES}
        assert logged.get("all_reduce train/trainer.py") == 1, logged
