"""The training loop each Ray Train worker runs (one process per worker).

Top to bottom: read this rank's share of the length-bucketed batches, hand
``train.accumulate`` of them at a time to the engine (DDP or DeepSpeed) for one
optimizer step, log on rank 0, and every ``train.checkpoint_every`` steps write
a checkpoint and report it to Ray with ``validation=True`` so the evaluator
actor scores it while training goes on. A restarted worker resumes from
``ray.train.get_checkpoint()``: weights, optimizer, scaler, LR schedule, step,
epoch, the sampler's position and every rank's RNG states.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from distnmt.checkpoint import (
    checkpoint_step,
    load_checkpoint,
    newest_valid_checkpoint,
    rank_manifest_name,
    save_checkpoint,
    write_rank_manifest,
)
from distnmt.config import Config, config_from_dict
from distnmt.data.batch import collate
from distnmt.data.prepared import PreparedData
from distnmt.data.sampler import BucketBatchSampler
from distnmt.data.tokenizer import PAD_ID
from distnmt.evaluate.translator import SRC_SPM, TGT_SPM
from distnmt.model.build import build_model
from distnmt.train.engine import DEEPSPEED_SUBDIR, DEEPSPEED_TAG, Engine, StepStats, build_engine, zero_stage
from distnmt.train.reshard import remove_universal, universal_for
from distnmt.train.wandb_run import start_wandb

RNG_DIR = "rng"
NONFINITE_FILE = "nonfinite.json"  # in the run directory when training stopped on a non-finite loss


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
        self.steps = 0
        self.started = time.time()

    def add(self, stats: StepStats) -> None:
        self.loss_sum += stats.loss_sum
        self.tokens += stats.tokens
        self.padded += stats.padded_tokens
        self.steps += 1

    def read(self) -> dict[str, float]:
        """Global figures; a collective, so every rank must call it."""
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
            "step_time_s": seconds / max(self.steps, 1),
        }


def _step_batches(sampler: BucketBatchSampler, accumulate: int) -> Iterator[list[list[int]]]:
    """This rank's batches, ``accumulate`` at a time (a short group at the epoch's end)."""
    group: list[list[int]] = []
    for indices in sampler:
        group.append(indices)
        if len(group) == accumulate:
            yield group
            group = []
    if group:
        yield group


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point Ray Train calls in every worker process."""
    cfg = config_from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Two workers on two cores must not each spawn a thread per core.
    torch.set_num_threads(cfg.train.threads_per_worker)
    device = ray.train.torch.get_device()

    prepared = PreparedData.from_config(cfg.data)
    manifest = prepared.manifest
    src, tgt = prepared.train_arrays()
    sampler = BucketBatchSampler(
        src.lengths, tgt.lengths, cfg.data.max_tokens, num_replicas=world, rank=rank,
        seed=cfg.train.seed, pool_batches=cfg.data.pool_batches, max_sentences=cfg.data.max_sentences,
        bucketing=cfg.data.bucketing,
    )
    vocab_size = prepared.vocab_sizes

    saved_cfg = cfg  # what checkpoints record: the run's config, not this world size's
    cfg = _at_world_size(cfg, world)
    resume = _resume_source(ray.train.get_checkpoint(), cfg, run_dir, rank)
    # ZeRO partitions written by another number of ranks: a universal copy to load.
    universal = (universal_for(Path(resume.path), DEEPSPEED_SUBDIR, DEEPSPEED_TAG, zero_stage(cfg), world,
                               run_dir, rank, say=_say if rank == 0 else lambda _: None)
                 if resume is not None and cfg.train.backend == "deepspeed" else None)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    model = build_model(cfg.model, vocab_size["src"], vocab_size["tgt"], pad_id=PAD_ID).to(device)
    engine = build_engine(cfg, model, device, wrap=ray.train.torch.prepare_model, universal=universal)
    step, epoch = 0, 0
    wandb_id: Optional[str] = None

    if resume is not None:
        with resume.as_directory() as directory:
            ckpt = load_checkpoint(Path(directory), map_location=device)
            engine.load(ckpt.state, Path(directory))
            remove_universal(universal, rank)
            rng_file = Path(directory) / RNG_DIR / f"rank{rank}.pt"
            if rng_file.exists():  # absent when resuming on more ranks than were saved
                _set_rng_state(torch.load(rng_file, weights_only=True))
        sampler.load_state_dict(ckpt.state["sampler"])
        step, epoch = int(ckpt.state["step"]), int(ckpt.state["epoch"])
        wandb_id = ckpt.meta.get("wandb_run_id")
        if rank == 0:
            _say(f"[train] resumed from {Path(directory).name} at step {step}, epoch {epoch}")
            saved_world = int(ckpt.meta.get("world_size", world))
            if saved_world != world:
                _say(f"[train] world size {saved_world} -> {world}: the rest of epoch {epoch} is re-sharded over "
                     f"{world} rank(s) ({len(sampler) - sampler.position} batches each), nothing trained twice "
                     "but the steps since the checkpoint")
    else:
        sampler.set_epoch(epoch)

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    wandb_run = start_wandb(cfg, run_dir, wandb_id) if rank == 0 else None
    batch_log = _open_batch_log(cfg, run_dir, rank)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        _say(
            f"[train] {cfg.train.backend} on {world} worker(s) ({device.type}), {params / 1e6:.2f}M parameters, "
            f"{len(sampler)} batches per rank per epoch, padding efficiency {sampler.padding_efficiency():.3f}, "
            f"precision {cfg.train.precision}, accumulate {cfg.train.accumulate}"
        )
        if saved_cfg.train.elastic or world != saved_cfg.train.max_workers:
            _say(_effective_batch_line(saved_cfg, world))

    meter = _Meter()
    # train.max_minutes counts from here: this worker group's first step (a restarted
    # group gets the budget afresh; the benchmarks that use it run once).
    deadline = time.time() + 60 * cfg.train.max_minutes if cfg.train.max_minutes is not None else None
    stop_reason: Optional[str] = None
    preempted = False  # a just-in-time checkpoint is written once per preemption notice
    nonfinite = 0  # consecutive steps with a non-finite loss or gradient (not applied)
    while step < cfg.train.max_steps and epoch < cfg.train.max_epochs and not stop_reason:
        for group in _step_batches(sampler, cfg.train.accumulate):
            batches = [collate(src, tgt, indices).to(device) for indices in group]
            _maybe_inject_fault(step + 1, rank)
            engine.poison_loss = _nan_injected(step + 1)
            stats = engine.train_step(batches)
            nonfinite = _nonfinite_streak(nonfinite, stats, step + 1, rank, device)
            meter.add(stats)
            step += 1
            if batch_log is not None:
                for batch in batches:
                    batch_log.write(f"{step} {epoch} {' '.join(map(str, batch.indices))}\n")
                batch_log.flush()
            if step % cfg.logging.log_every == 0:
                metrics = meter.read()  # a collective: every rank calls it
                meter.reset()
                if rank == 0:
                    left = (len(sampler) - sampler.position) / cfg.train.accumulate
                    _log(step, epoch, cfg, metrics | {"world_size": world, "accumulate": cfg.train.accumulate},
                         stats, left * metrics["step_time_s"], wandb_run, run_dir / "metrics.jsonl")
            if nonfinite >= cfg.train.max_nonfinite_steps:
                _report_nonfinite(cfg, run_dir, step, nonfinite, rank)
                stop_reason = "non-finite loss"
                break
            out_of_time = deadline is not None and _out_of_time(deadline, rank, device)
            checkpoint_now = step % cfg.train.checkpoint_every == 0 or step >= cfg.train.max_steps or out_of_time
            if not preempted and step % cfg.train.preemption_check_every == 0:
                preempted = _preemption_notice(rank, step)  # a barrier: every rank asks at the same steps
                checkpoint_now |= preempted
            if checkpoint_now and _checkpointable(engine, nonfinite, step, rank):
                _checkpoint_and_report(saved_cfg, engine, sampler, step, epoch, rank, world, manifest, vocab_size,
                                       wandb_run.id if wandb_run is not None else wandb_id)
                stop_reason = _stop_requested(loop_config, rank)
            if out_of_time and not stop_reason:
                stop_reason = f"train.max_minutes={cfg.train.max_minutes:g} spent"
            if step >= cfg.train.max_steps or stop_reason:
                break
        else:
            epoch += 1
            sampler.set_epoch(epoch)
    if rank == 0 and stop_reason:
        _say(f"[train] stopping at step {step}: {stop_reason}")
    if batch_log is not None:
        batch_log.close()
    if wandb_run is not None:
        wandb_run.finish()


def _at_world_size(cfg: Config, world: int) -> Config:
    """The config as this worker group runs it: ``train.accumulate`` for ``world`` ranks.

    ``accumulate`` is meant at ``max_workers`` ranks (see TrainConfig.accumulate_at);
    an elastic group that lost workers accumulates more, so an optimizer step still
    covers the configured token budget and the learning dynamics stay the same.
    """
    train = dataclasses.replace(cfg.train, accumulate=cfg.train.accumulate_at(world))
    return dataclasses.replace(cfg, train=train)


def _effective_batch_line(cfg: Config, world: int) -> str:
    """The log line that says how the effective batch was kept at this world size."""
    want = cfg.train.accumulate * cfg.train.max_workers * cfg.data.max_tokens
    acc = cfg.train.accumulate_at(world)
    have = acc * world * cfg.data.max_tokens
    how = "the configured effective batch" if have == want else f"not the configured {want}: {world} does not divide it"
    return (f"[train] world size {world} of {cfg.train.min_workers}-{cfg.train.max_workers}: accumulating {acc} "
            f"micro-batch(es) per rank per step = {have} tokens per step, {how}")


def _preemption_notice(rank: int, step: int) -> bool:
    """Whether Ray reports a node of this run as being preempted (drained).

    ``ray.train.get_preemption_info`` is a barrier across the workers, so every rank
    calls it at the same steps. A spot node's shutdown hook (launch/preempt-node.sh)
    drains it with a deadline; the caller then writes a checkpoint at once, and when
    the node goes, Ray restarts the group on what is left (elastic) from that step.
    """
    info = ray.train.get_preemption_info()
    if info is None:
        return False
    if rank == 0:
        left = "" if info.deadline_ms is None else f", {info.deadline_ms / 1000 - time.time():.0f} s before it goes"
        _say(f"[train] preemption notice for rank(s) {info.preempted_ranks}{left}: checkpointing at step {step}")
    return True


def _resume_source(reported: Optional[ray.train.Checkpoint], cfg: Config, run_dir: Path,
                   rank: int) -> Optional[ray.train.Checkpoint]:
    """The checkpoint to resume from: the newest complete one, whoever knows of it.

    Ray registers a reported checkpoint when its controller next polls (every 2 s
    by default): a worker that dies just after reporting can leave Ray resuming
    from an older checkpoint, or from none, although a newer one is on disk. The
    run directory (local or a shared mount; the driver refuses URIs) is therefore
    scanned too, and a corrupt or incomplete checkpoint is skipped with a warning. Rank 0 decides and
    tells the others, so every rank loads the same one.
    """
    choice: list[Optional[str]] = [None]
    if rank == 0:
        newest = newest_valid_checkpoint(run_dir)
        if newest is not None and (reported is None or checkpoint_step(Path(reported.path)) < checkpoint_step(newest)):
            if reported is not None:
                _say(f"[train] Ray's latest checkpoint is {Path(reported.path).name}; {newest.name} on disk is newer")
            choice[0] = str(newest)
        elif reported is not None:
            choice[0] = reported.path
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return ray.train.Checkpoint.from_directory(choice[0]) if choice[0] else None


def _maybe_inject_fault(step: int, rank: int) -> None:
    """Fault injection for the reliability tests: SIGKILL this worker before ``step``.

    DISTNMT_FAULT_KILL="RANK:STEP:MARKER" kills rank RANK as it starts step STEP
    (its peers are then blocked in the step's collectives), once: the marker file
    keeps the restarted worker alive. A real signal to a real process.
    """
    spec = os.environ.get("DISTNMT_FAULT_KILL")
    if not spec:
        return
    fault_rank, fault_step, marker = spec.split(":", 2)
    if rank == int(fault_rank) and step == int(fault_step) and not Path(marker).exists():
        Path(marker).write_text(f"rank {rank} killed at step {step}\n")
        _say(f"[train] fault injection: SIGKILL rank {rank} at step {step}")
        os.kill(os.getpid(), signal.SIGKILL)


def _open_batch_log(cfg: Config, run_dir: Path, rank: int):
    """With train.log_batches: 'step epoch pair-ids...' per batch, appended across restarts."""
    if not cfg.train.log_batches:
        return None
    path = run_dir / "batches" / f"rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8")


def _log(step: int, epoch: int, cfg: Config, metrics: dict[str, float], last: StepStats,
         eta_s: float, wandb_run: Optional[Any], metrics_path: Path) -> None:
    """A progress line, a line of <run_dir>/metrics.jsonl, and W&B (rank 0 only)."""
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(metrics_path, "a", encoding="utf-8") as handle:  # the same figures W&B gets, locally
        handle.write(json.dumps({"step": step, "epoch": epoch, "time": time.time(), "lr": last.lr,
                                 "grad_norm": last.grad_norm, "loss_scale": last.loss_scale,
                                 "peak_rss_mib": rss_mib, **metrics}) + "\n")
    _say(
        f"[train] step {step}/{cfg.train.max_steps} epoch {epoch} | loss {metrics['loss']:.3f} "
        f"| ppl {metrics['ppl']:.1f} | {metrics['tokens_per_s']:.0f} tgt tok/s "
        f"| padding eff {metrics['target_padding_efficiency']:.3f} | lr {last.lr:.2e} "
        f"| grad norm {last.grad_norm:.2f} | {metrics['world_size']} worker(s) | epoch ETA {eta_s / 60:.1f} min"
    )
    if wandb_run is not None:
        record = {f"train/{k}": v for k, v in metrics.items()}
        record |= {
            "train/lr": last.lr, "train/grad_norm": last.grad_norm, "train/loss_scale": last.loss_scale,
            "train/peak_rss_mib": rss_mib, "epoch": epoch,
        }
        if torch.cuda.is_available():
            record["train/gpu_peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
        wandb_run.log(record, step=step)


def _checkpoint_and_report(cfg: Config, engine: Engine, sampler: BucketBatchSampler, step: int, epoch: int,
                           rank: int, world: int, manifest: dict[str, Any], vocab_size: dict[str, int],
                           wandb_id: Optional[str]) -> None:
    """Every rank writes its part into its own temp dir and reports it; Ray merges them.

    Rank 0 writes the checkpoint proper (state.pt with full weights, meta.json with
    checksums, the sentencepiece models); every rank adds its RNG state and, for
    DeepSpeed, its optimizer partition. ``report`` is a barrier across ranks.
    """
    name = f"checkpoint_{step:08d}"
    with tempfile.TemporaryDirectory(prefix="distnmt-ckpt-") as tmp:
        directory = Path(tmp) / name
        if rank == 0:
            prepared = PreparedData.from_config(cfg.data)
            state = engine.state_for_checkpoint() | {"sampler": sampler.state_dict(), "step": step, "epoch": epoch}
            save_checkpoint(
                directory, state, step=step, config=cfg.to_dict(),
                vocab_sha256=manifest["spm_sha256"],
                extra_meta={
                    "vocab_size": vocab_size, "epoch": epoch, "wandb_run_id": wandb_id, "world_size": world,
                    # Each rank's list of its files with checksums (see distnmt/checkpoint.py).
                    "required": [rank_manifest_name(r) for r in range(world)],
                },
                extra_files={
                    SRC_SPM: prepared.spm_model(cfg.data.src_lang),
                    TGT_SPM: prepared.spm_model(cfg.data.tgt_lang),
                },
            )
        engine.save_sharded(directory)
        (directory / RNG_DIR).mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), directory / RNG_DIR / f"rank{rank}.pt")
        write_rank_manifest(directory, rank)  # last: it vouches for this rank's files
        ray.train.report(
            _reported_metrics(step, epoch),
            checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
            checkpoint_dir_name=name,
            validation=True,
        )


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


def _out_of_time(deadline: float, rank: int, device: torch.device) -> bool:
    """Whether train.max_minutes is spent, decided by rank 0 and the same on every rank.

    Each rank's own clock could tip over at different steps, and a rank that stops
    while another goes on would hang DDP; a MAX all-reduce of rank 0's flag cannot.
    """
    flag = torch.tensor([1 if rank == 0 and time.time() >= deadline else 0], dtype=torch.int32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# The dev BLEU a checkpoint is reported with until the evaluator's score replaces it:
# below any BLEU (0-100), so an unscored checkpoint ranks last. Not NaN: Ray saves its
# checkpoint list as JSON that writes NaN as null, and a rerun restoring that list then
# fails to rank the next checkpoint (seen: a driver SIGKILLed with one unscored).
UNSCORED_BLEU = -1.0


def _reported_metrics(step: int, epoch: int) -> dict[str, Any]:
    """What rank 0 reports with a checkpoint (Ray ranks checkpoints by ``bleu``)."""
    return {"step": step, "epoch": epoch, "bleu": UNSCORED_BLEU}


def _nan_injected(step: int) -> bool:
    """Fault injection for the reliability tests: make the loss of ``step`` NaN.

    DISTNMT_FAULT_NAN="4,9-" poisons step 4 and every step from 9 on, on every
    rank. The NaN then goes through the real backward, clipping and update code.
    """
    spec = os.environ.get("DISTNMT_FAULT_NAN", "")
    for part in filter(None, spec.split(",")):
        first, dash, last = part.partition("-")
        if int(first) <= step and (step <= int(last) if last else bool(dash) or step == int(first)):
            return True
    return False


def _nonfinite_streak(streak: int, stats: StepStats, step: int, rank: int, device: torch.device) -> int:
    """The count of consecutive non-finite steps after this one, the same on every rank.

    A MIN all-reduce of one flag: a rank's loss can be NaN while another's is not.
    On the training device: NCCL reduces GPU tensors only.
    """
    flag = torch.tensor([1 if stats.finite else 0], dtype=torch.int32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if bool(flag.item()):
        return 0
    if rank == 0:
        _say(f"[train] step {step}: non-finite loss or gradient, update skipped ({streak + 1} in a row)")
    return streak + 1


def _checkpointable(engine: Engine, nonfinite: int, step: int, rank: int) -> bool:
    """Never checkpoint from a non-finite state: during a streak of skipped steps, or with
    non-finite weights (every rank holds the full weights, so all ranks agree)."""
    if nonfinite == 0 and all(bool(torch.isfinite(p).all()) for p in engine.module.parameters()):
        return True
    if rank == 0:
        _say(f"[train] step {step}: no checkpoint, the training state is not finite")
    return False


def _report_nonfinite(cfg: Config, run_dir: Path, step: int, streak: int, rank: int) -> None:
    """Tell the driver why training stops, in a file of the run directory: Ray's result
    carries only the metrics of checkpoints, and raising would make Ray retry the run."""
    if rank != 0:
        return
    message = (
        f"training stopped at step {step}: loss or gradients non-finite for {streak} consecutive steps "
        f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); try a lower optim.lr or bf16 instead of fp16"
    )
    _say(f"[train] {message}")
    tmp = run_dir / f".{NONFINITE_FILE}.tmp"
    tmp.write_text(json.dumps({"step": step, "message": message}), encoding="utf-8")
    os.replace(tmp, run_dir / NONFINITE_FILE)
