"""What only a CUDA GPU can show (``pytest -m gpu tests/gpu``; ``distnmt bench gpu`` runs them).

Each test spawns its own process where it needs a process group (NCCL) or global
switches (deterministic algorithms), so one test's state cannot leak into another.
Data is synthetic (tests/test_engine.py's ragged batches): the GPU machine need not
hold the corpus. Without CUDA every test here is skipped with its reason.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (distnmt bench gpu runs these on one)"),
]
VOCAB = 40
TINY = ["model.embed_size=16", "model.hidden_size=24", "model.align_size=16", "model.maxout_size=12",
        "train.use_gpu=true"]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batches(device: torch.device):
    from test_engine import BATCHES

    return [b.to(device, non_blocking=True) for b in (b.pin_memory() for b in BATCHES)]


def _engine(overrides: list[str], device: torch.device):
    from distnmt.config import load_config
    from distnmt.model.build import build_model
    from distnmt.train.engine import build_engine

    cfg = load_config(None, TINY + overrides)
    torch.manual_seed(0)
    return build_engine(cfg, build_model(cfg.model, VOCAB, VOCAB).to(device), device,
                        wrap=lambda m: torch.nn.parallel.DistributedDataParallel(m, device_ids=[device.index]))


def _init(rank: int, world: int, port: int, backend: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)


def _ddp_nccl(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    _init(rank, 1, port, "nccl")
    try:
        device = torch.device("cuda", rank)
        engine = _engine(["optim.name=adam", "train.precision=bf16", "train.accumulate=2"], device)
        flag = torch.ones(1, device=device)
        dist.all_reduce(flag)  # NCCL reduces CUDA tensors
        losses = [engine.train_step(_batches(device)).loss_sum for _ in range(4)]
        torch.save({"losses": losses, "flag": float(flag)}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_over_nccl_with_one_worker(tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    mp.spawn(_ddp_nccl, args=(_port(), str(out)), nprocs=1, join=True)
    result = torch.load(out, weights_only=True)
    assert result["flag"] == 1.0
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["losses"][-1] < result["losses"][0]  # the same batches: the loss falls


def _zero2(rank: int, port: int, tmp: str) -> None:
    import torch.distributed as dist

    _init(rank, 1, port, "nccl")
    try:
        ds = Path(tmp) / "zero2.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "steps_per_print": 10**9}))
        device = torch.device("cuda", rank)
        engine = _engine(["optim.name=adam", "optim.lr=0.003", "train.precision=bf16", "train.backend=deepspeed",
                          f"train.deepspeed_config={ds}"], device)
        losses = [engine.train_step(_batches(device)[:1]).loss_sum for _ in range(4)]
        weights = engine.state_for_checkpoint()["model"]
        torch.save({"losses": losses, "weights": weights}, Path(tmp) / "out.pt")
    finally:
        dist.destroy_process_group()


def test_deepspeed_zero2_bf16(tmp_path: Path) -> None:
    mp.spawn(_zero2, args=(_port(), str(tmp_path)), nprocs=1, join=True)
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    assert result["losses"][-1] < result["losses"][0]
    weights = result["weights"]
    assert all(w.dtype == torch.float32 and w.device.type == "cpu" for w in weights.values())
    assert any(not torch.equal(w, w.bfloat16().float()) for w in weights.values())  # fp32 masters, not bf16 copies


def test_fp16_loss_scaling_skips_an_overflow_and_lowers_the_scale() -> None:
    device = torch.device("cuda")
    engine = _engine(["optim.name=adam", "train.precision=fp16"], device)
    first = engine.train_step(_batches(device))
    assert first.finite
    scale = first.loss_scale
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    engine.poison_loss = True
    skipped = engine.train_step(_batches(device))
    assert not skipped.finite and skipped.loss_scale == scale / 2
    assert all(torch.equal(before[k], v) for k, v in engine.module.state_dict().items())
    engine.poison_loss = False
    assert engine.train_step(_batches(device)).finite


def test_the_engine_step_makes_no_host_sync_with_fused_adam() -> None:
    device = torch.device("cuda")
    engine = _engine(["optim.name=adam", "train.precision=bf16", "train.accumulate=2"], device)
    batches = _batches(device)
    engine.train_step(batches)  # optimizer state, cuDNN plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.train_step(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ours = [f"{w.filename}:{w.lineno}" for w in caught
            if "synchroniz" in str(w.message) and "/distnmt/train/" in w.filename]
    assert ours == [], ours


def _resume(rank: int, out: str) -> None:
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=True)  # a warning, not an error, for an op without one
    from distnmt.train.rng import rng_state, set_rng_state

    device = torch.device("cuda")
    overrides = ["optim.name=adam", "model.dropout=0.3", "train.precision=bf16"]  # dropout draws from the CUDA generator
    torch.cuda.manual_seed_all(7)
    a = _engine(overrides, device)
    for _ in range(2):
        a.train_step(_batches(device))
    saved = {"engine": {k: v for k, v in a.state_for_checkpoint().items()}, "rng": rng_state()}
    path = Path(out).with_suffix(".state")
    torch.save(saved, path)
    for _ in range(2):
        a.train_step(_batches(device))
    b = _engine(overrides, device)
    torch.cuda.manual_seed_all(12345)  # a restarted process: different generator state until restored
    state = torch.load(path, weights_only=True)
    b.load(state["engine"], Path(out).parent)
    set_rng_state(state["rng"])
    for _ in range(2):
        b.train_step(_batches(device))
    same = all(torch.equal(a.module.state_dict()[k], v) for k, v in b.module.state_dict().items())
    Path(out).write_text(json.dumps({"same": same}))


def test_bit_exact_resume_including_the_cuda_generator(tmp_path: Path) -> None:
    out = tmp_path / "resume.json"
    mp.spawn(_resume, args=(str(out),), nprocs=1, join=True)
    assert json.loads(out.read_text()) == {"same": True}


@pytest.mark.parametrize("gru", ["cudnn", "paper"])
def test_gru_variants_on_cuda_match_the_cpu(gru: str) -> None:
    from distnmt.model import RNNSearch
    from test_engine import BATCHES

    torch.manual_seed(0)
    cpu = RNNSearch(VOCAB, VOCAB, embed_size=16, hidden_size=24, align_size=16, maxout_size=12, gru=gru, init="torch")
    cuda = RNNSearch(VOCAB, VOCAB, embed_size=16, hidden_size=24, align_size=16, maxout_size=12, gru=gru,
                     init="torch").cuda()
    cuda.load_state_dict(cpu.state_dict())
    b = BATCHES[1]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref = cpu(b.src, b.src_lengths, b.tgt_in)
        got = cuda(b.src.cuda(), b.src_lengths, b.tgt_in.cuda())
        torch.testing.assert_close(got.cpu(), ref, atol=1e-4, rtol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            enc = cuda.encode(b.src.cuda(), b.src_lengths)
            _, state, _ = cuda.decode_step(enc, b.tgt_in[:, 0].cuda(), enc.init_state)
            logits = cuda(b.src.cuda(), b.src_lengths, b.tgt_in.cuda())
        assert state.dtype == torch.float32 and logits.dtype == torch.float32  # the state in fp32 (docs/MODEL.md)
        torch.testing.assert_close(logits.cpu(), ref, atol=0.1, rtol=0.1)
    finally:
        torch.backends.cudnn.allow_tf32 = True
