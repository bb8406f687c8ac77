"""Engines without Ray: a real 2-process gloo DDP step equals one single-process
step over both ranks' batches; DeepSpeed JSON completion and refusals; LR schedules."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distnmt.config import ConfigError, load_config
from distnmt.data.batch import Batch
from distnmt.model.build import build_model
from distnmt.train.engine import DDPEngine, deepspeed_config
from distnmt.train.schedule import lr_multiplier

from ranks import free_port, start_ranks  # tests/ranks.py

TINY = ["model.embed_size=8", "model.hidden_size=12", "model.align_size=10", "model.maxout_size=6",
        "optim.name=adam", "optim.lr=0.01", "train.precision=fp32"]
VOCAB = 40


def _batch(seed: int, n: int, src_len: int, tgt_len: int) -> Batch:
    """A real-shaped batch with ragged lengths (so ranks have different token counts)."""
    g = torch.Generator().manual_seed(seed)
    src_lengths = torch.randint(2, src_len + 1, (n,), generator=g)
    src_lengths[0] = src_len
    tgt_lengths = torch.randint(2, tgt_len + 1, (n,), generator=g)
    tgt_lengths[0] = tgt_len
    src = torch.zeros(n, src_len, dtype=torch.long)
    tgt_in = torch.zeros(n, tgt_len, dtype=torch.long)
    tgt_out = torch.zeros(n, tgt_len, dtype=torch.long)
    for i in range(n):
        src[i, : src_lengths[i]] = torch.randint(4, VOCAB, (int(src_lengths[i]),), generator=g)
        ids = torch.randint(4, VOCAB, (int(tgt_lengths[i]),), generator=g)
        tgt_in[i, : tgt_lengths[i]] = torch.cat([torch.tensor([2]), ids[:-1]])
        tgt_out[i, : tgt_lengths[i]] = ids
    return Batch(src=src, src_lengths=src_lengths, tgt_in=tgt_in, tgt_out=tgt_out, indices=list(range(n)))


BATCHES = [_batch(1, 3, 7, 5), _batch(2, 5, 4, 9)]  # rank 0's and rank 1's: different token counts


def _engine(accumulate: int = 1) -> DDPEngine:
    cfg = load_config(None, TINY + [f"train.accumulate={accumulate}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB, VOCAB)
    return DDPEngine(cfg, model, torch.device("cpu"), wrap=torch.nn.parallel.DistributedDataParallel)


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        engine = _engine()
        stats = engine.train_step([BATCHES[rank]])
        if rank == 0:
            torch.save({"params": engine.module.state_dict(), "grad_norm": stats.grad_norm}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_step_equals_single_process_step_on_both_batches(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    start_ranks(_ddp_worker, (free_port(), str(out)), 2)
    ddp = torch.load(out, weights_only=True)

    # One process, the two ranks' batches as two micro-batches of one step: the
    # same token-weighted mean, hence the same update.
    single = _engine(accumulate=2)
    stats = single.train_step(BATCHES)
    assert stats.grad_norm == pytest.approx(ddp["grad_norm"], rel=1e-5)
    for name, value in single.module.state_dict().items():
        torch.testing.assert_close(ddp["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # And the step did change the weights (this test would otherwise prove nothing).
    fresh = _engine().module.state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in single.module.state_dict().items())


def test_ddp_engine_state_round_trip() -> None:
    a = _engine()
    a.train_step([BATCHES[0]])
    saved = io.BytesIO()  # through bytes, as a checkpoint would be (state_dict() shares tensors)
    torch.save(a.state_for_checkpoint(), saved)
    saved.seek(0)
    b = _engine()
    b.load(torch.load(saved, weights_only=True), Path("."))
    a.train_step([BATCHES[1]])
    b.train_step([BATCHES[1]])
    for name, value in a.module.state_dict().items():
        torch.testing.assert_close(b.module.state_dict()[name], value, msg=name)


def _ds(tmp_path: Path, body: dict, overrides: list[str] = []) -> dict:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(body))
    cfg = load_config(None, ["train.backend=deepspeed", f"train.deepspeed_config={path}", *overrides])
    return deepspeed_config(cfg, world=2)


def test_deepspeed_config_is_completed_from_the_yaml(tmp_path: Path) -> None:
    ds = _ds(tmp_path, {"zero_optimization": {"stage": 2}}, ["train.precision=bf16", "train.accumulate=3", "optim.clip_norm=0.5"])
    assert ds["train_batch_size"] == 6 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2


def test_deepspeed_json_contradicting_the_yaml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is 4 but the YAML config implies 1"):
        _ds(tmp_path, {"gradient_accumulation_steps": 4})
    with pytest.raises(ConfigError, match=r"bf16.enabled is True but the YAML config implies False"):
        _ds(tmp_path, {"bf16": {"enabled": True}}, ["train.precision=fp32"])
    with pytest.raises(ConfigError, match="DeepSpeed has stages 0, 1, 2 and 3"):
        _ds(tmp_path, {"zero_optimization": {"stage": 4}})
    with pytest.raises(ConfigError, match="remove 'optimizer'"):
        _ds(tmp_path, {"optimizer": {"type": "Adam"}})


def test_shipped_deepspeed_configs_are_valid(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    for path in sorted((repo / "configs/deepspeed").glob("*.json")):
        cfg = load_config(None, ["train.backend=deepspeed", f"train.deepspeed_config={path}"])
        assert deepspeed_config(cfg, world=2)["zero_optimization"]["stage"] in (0, 1, 2)


def test_deepspeed_backend_needs_a_json() -> None:
    with pytest.raises(ConfigError, match="train.deepspeed_config"):
        load_config(None, ["train.backend=deepspeed"])


def test_lr_schedules() -> None:
    cfg = load_config(None, ["optim.schedule=inverse_sqrt", "optim.warmup_steps=4"]).optim
    assert [lr_multiplier(s, cfg, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(15, cfg, 100) == pytest.approx(0.5)  # sqrt(4 / 16)
    cfg = load_config(None, ["optim.schedule=cosine", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1"]).optim
    assert lr_multiplier(0, cfg, 12) == 0.5
    assert lr_multiplier(1, cfg, 12) == pytest.approx(1.0)
    assert lr_multiplier(11, cfg, 12) == pytest.approx(0.1)
    assert load_config(None, []).optim.schedule == "constant"
    assert lr_multiplier(50, load_config(None, []).optim, 100) == 1.0
