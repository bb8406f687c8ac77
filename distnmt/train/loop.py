"""The training loop each Ray Train worker runs (DDP; one process per worker).

Top to bottom: read this rank's share of the length-bucketed batches, run the
model under autocast, step the optimizer, log on rank 0, and every
``train.checkpoint_every`` steps write a checkpoint and report it to Ray with
``validation=True`` so the evaluator actor scores it while training goes on.
A restarted worker resumes from ``ray.train.get_checkpoint()``: model,
optimizer, scaler, step, epoch, the sampler's position and RNG states.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distnmt.checkpoint import load_checkpoint, save_checkpoint
from distnmt.config import Config, config_from_dict
from distnmt.data.batch import Batch, collate
from distnmt.data.prepare import load_manifest
from distnmt.data.sampler import BucketBatchSampler
from distnmt.data.shards import TokenArray
from distnmt.data.tokenizer import PAD_ID, Tokenizer
from distnmt.evaluate.translator import SRC_SPM, TGT_SPM
from distnmt.model.build import build_model
from distnmt.train.optim import build_optimizer


def _autocast(cfg: Config, device: torch.device):
    """bf16/fp16 autocast on the worker's device; fp32 runs without it."""
    if cfg.train.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _say(line: str) -> None:
    """A progress line on stdout. Not print(): Ray Train patches print in workers
    and, with Ray's own stdout capture, every printed line would appear twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),  # the key array; weights_only can load lists
        "python": list(random.getstate()[1]),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


class _Meter:
    """Sums over the logging interval, reduced over all ranks when read."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum = 0.0
        self.tokens = 0
        self.padded = 0
        self.started = time.time()

    def add(self, loss_sum: float, batch: Batch) -> None:
        self.loss_sum += loss_sum
        self.tokens += batch.num_target_tokens()
        self.padded += batch.tgt_out.numel()

    def read(self) -> dict[str, float]:
        totals = torch.tensor([self.loss_sum, self.tokens, self.padded], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        loss_sum, tokens, padded = totals.tolist()
        seconds = max(time.time() - self.started, 1e-9)
        loss = loss_sum / max(tokens, 1)
        return {
            "loss": loss,
            "ppl": float(np.exp(min(loss, 50.0))),
            "tokens_per_s": tokens / seconds,
            "target_padding_efficiency": tokens / max(padded, 1),
        }


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point Ray Train calls in every worker process."""
    cfg = config_from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Two workers on two cores must not each spawn a thread per core.
    torch.set_num_threads(cfg.train.threads_per_worker)
    device = ray.train.torch.get_device()

    prepared = Path(cfg.data.prepared_dir)
    manifest = load_manifest(prepared)
    src_lang, tgt_lang = cfg.data.src_lang, cfg.data.tgt_lang
    src = TokenArray(prepared / f"train.{src_lang}")
    tgt = TokenArray(prepared / f"train.{tgt_lang}")
    sampler = BucketBatchSampler(
        src.lengths, tgt.lengths, cfg.data.max_tokens, num_replicas=world, rank=rank,
        seed=cfg.train.seed, pool_batches=cfg.data.pool_batches,
    )

    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    vocab_size = {
        "src": Tokenizer(prepared / f"spm.{src_lang}.model").vocab_size,
        "tgt": Tokenizer(prepared / f"spm.{tgt_lang}.model").vocab_size,
    }
    model = build_model(cfg.model, vocab_size["src"], vocab_size["tgt"], pad_id=PAD_ID).to(device)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    step, epoch = 0, 0

    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as directory:
            ckpt = load_checkpoint(Path(directory), map_location=device)
        model.load_state_dict(ckpt.state["model"])
        optimizer.load_state_dict(ckpt.state["optimizer"])
        scaler.load_state_dict(ckpt.state["scaler"])
        sampler.load_state_dict(ckpt.state["sampler"])
        _set_rng_state(ckpt.state["rng"])
        step, epoch = int(ckpt.state["step"]), int(ckpt.state["epoch"])
        if rank == 0:
            _say(f"[train] resumed from {Path(directory).name} at step {step}, epoch {epoch}")
    else:
        sampler.set_epoch(epoch)

    ddp_model = ray.train.torch.prepare_model(model) if world > 1 else model
    wandb_run = _start_wandb(cfg, run_dir) if rank == 0 else None
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        _say(
            f"[train] {world} worker(s), {params / 1e6:.2f}M parameters, {len(sampler)} batches per rank per epoch, "
            f"padding efficiency {sampler.padding_efficiency():.3f}, precision {cfg.train.precision}"
        )

    meter = _Meter()
    stop_reason: Optional[str] = None
    while step < cfg.train.max_steps and epoch < cfg.train.max_epochs and not stop_reason:
        for indices in sampler:
            batch = collate(src, tgt, indices).to(device)
            loss_sum = _train_step(cfg, ddp_model, optimizer, scaler, batch, device)
            meter.add(loss_sum, batch)
            step += 1
            if step % cfg.logging.log_every == 0:
                metrics = meter.read()  # a collective: every rank calls it
                meter.reset()
                if rank == 0:
                    _log(step, epoch, cfg, metrics, wandb_run)
            if step % cfg.train.checkpoint_every == 0 or step >= cfg.train.max_steps:
                _checkpoint_and_report(cfg, model, optimizer, scaler, sampler, step, epoch, rank, manifest, vocab_size)
                stop_reason = _stop_requested(loop_config, rank)
            if step >= cfg.train.max_steps or stop_reason:
                break
        else:
            epoch += 1
            sampler.set_epoch(epoch)
    if rank == 0 and stop_reason:
        _say(f"[train] stopping at step {step}: {stop_reason}")
    if wandb_run is not None:
        wandb_run.finish()


def _stop_requested(loop_config: dict[str, Any], rank: int) -> Optional[str]:
    """Rank 0 asks the evaluator whether to stop (early stopping); every rank learns the answer.

    The evaluator answers at once even while decoding (it is a threaded actor), so
    this costs a round trip per checkpoint, not an evaluation.
    """
    reason: list[Optional[str]] = [None]
    if rank == 0 and loop_config.get("evaluator"):
        actor = ray.get_actor(loop_config["evaluator"], namespace=loop_config["namespace"])
        reason[0] = ray.get(actor.stop_reason.remote())
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(reason, src=0)
    return reason[0]


def _train_step(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, batch: Batch, device: torch.device) -> float:
    """One optimizer step; returns the summed (not averaged) token loss of this rank's batch."""
    with _autocast(cfg, device):
        logits = model(batch.src, batch.src_lengths, batch.tgt_in)
    # Loss in fp32 whatever the autocast dtype: log-softmax over 30k words needs it.
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD_ID, reduction="sum")
    loss = loss_sum / max(batch.num_target_tokens(), 1)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.optim.clip_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
    scaler.step(optimizer)
    scaler.update()
    return float(loss_sum.detach())


def _log(step: int, epoch: int, cfg: Config, metrics: dict[str, float], wandb_run: Optional[Any]) -> None:
    _say(
        f"[train] step {step}/{cfg.train.max_steps} epoch {epoch} | loss {metrics['loss']:.3f} "
        f"| ppl {metrics['ppl']:.1f} | {metrics['tokens_per_s']:.0f} tgt tok/s "
        f"| tgt padding eff {metrics['target_padding_efficiency']:.3f}"
    )
    if wandb_run is not None:
        wandb_run.log({f"train/{k}": v for k, v in metrics.items()} | {"epoch": epoch}, step=step)


def _checkpoint_and_report(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler, sampler: BucketBatchSampler, step: int, epoch: int,
                           rank: int, manifest: dict[str, Any], vocab_size: dict[str, int]) -> None:
    """Rank 0 writes the checkpoint; every rank reports (report is a barrier)."""
    name = f"checkpoint_{step:08d}"
    with tempfile.TemporaryDirectory(prefix="distnmt-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            prepared = Path(cfg.data.prepared_dir)
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": _rng_state(),
                "step": step,
                "epoch": epoch,
            }
            directory = save_checkpoint(
                Path(tmp) / name, state, step=step, config=cfg.to_dict(),
                vocab_sha256=manifest["spm_sha256"],
                extra_meta={"vocab_size": vocab_size, "epoch": epoch},
                extra_files={
                    SRC_SPM: prepared / f"spm.{cfg.data.src_lang}.model",
                    TGT_SPM: prepared / f"spm.{cfg.data.tgt_lang}.model",
                },
            )
            checkpoint = ray.train.Checkpoint.from_directory(str(directory))
        ray.train.report(
            {"step": step, "epoch": epoch},
            checkpoint=checkpoint,
            checkpoint_dir_name=name,
            validation=checkpoint is not None,
        )


def _start_wandb(cfg: Config, run_dir: Path) -> Optional[Any]:
    """W&B on rank 0 only (Ray Train V2 rejects the Tune logger callback)."""
    if cfg.logging.wandb == "disabled":
        return None
    import wandb  # imported late: it is slow to import and unused when disabled

    run_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=cfg.logging.wandb_project, name=cfg.train.name, config=cfg.to_dict(),
        mode=cfg.logging.wandb, dir=str(run_dir), resume="allow",
    )
