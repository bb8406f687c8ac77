"""The Trainer: one rank's training, resumable from one state dict, runnable in one process.

Its state (model, optimizer, LR schedule and loss scaler inside the engine, the
sampler's position, step, epoch and this rank's RNG states) is one
:meth:`Trainer.state_dict` / :meth:`Trainer.load_state_dict`. :meth:`Trainer.fit`
is the loop: hand ``accumulate`` micro-batches to the engine (DDP or DeepSpeed)
for one optimizer step, fetch the next step's batches while the device works,
agree with the other ranks on the step's facts in one small all-reduce, log at
intervals (the only time the loss is read on the host), checkpoint and stop as
the policies (train/policies.py) say.

What runs it is a :class:`~distnmt.train.session.Session`: one process with no
Ray (tests), or a Ray Train worker (train/loop.py), Ray Train's local mode
included. A restarted worker resumes from the newest complete checkpoint, Ray's
or the run directory's.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from distnmt.checkpoint import (
    META_EPOCH,
    META_REQUIRED,
    META_VOCAB_SIZE,
    META_WANDB_ID,
    META_WORLD_SIZE,
    checkpoint_name,
    checkpoint_step,
    clear_stale_temporaries,
    load_checkpoint,
    load_rng,
    newest_valid_checkpoint,
    rank_manifest_name,
    save_checkpoint,
    save_rng,
    spm_files,
    write_nonfinite,
    write_rank_manifest,
)
from distnmt.config import Config, batch_budget, update_sentences
from distnmt.data.prepared import PreparedData
from distnmt.data.sampler import BucketBatchSampler
from distnmt.data.tokenizer import PAD_ID
from distnmt.io import append_line
from distnmt.model.build import build_model
from distnmt.train import faults
from distnmt.train.batches import Prefetcher, StepGroup, step_groups
from distnmt.train.engine import StepStats, build_engine, zero_stage
from distnmt.train.policies import (
    CheckpointPolicy,
    NonfiniteStreak,
    PreemptionWatch,
    StopPolicy,
    TimeBudget,
    agree,
)
from distnmt.train.reshard import remove_universal, universal_for
from distnmt.train.rng import rng_state, set_rng_state
from distnmt.train.session import Session, say
from distnmt.train.wandb_run import start_wandb

# The dev BLEU a checkpoint is reported with until the evaluator's score replaces it:
# below any BLEU (0-100), so an unscored checkpoint ranks last. Not NaN: Ray saves its
# checkpoint list as JSON that writes NaN as null, and a rerun restoring that list then
# fails to rank the next checkpoint (seen: a driver SIGKILLed with one unscored).
UNSCORED_BLEU = -1.0


def reported_metrics(step: int, epoch: int) -> dict[str, Any]:
    """What a checkpoint is reported to Ray with (Ray ranks checkpoints by ``bleu``)."""
    return {"step": step, "epoch": epoch, "bleu": UNSCORED_BLEU}


class Meter:
    """Sums over the logging interval, kept where the engine's figures are (device
    tensors stay on the device), reduced over all ranks and read only when logged."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: list[Any] = [0.0, 0.0, 0.0]  # loss, target tokens, padded target tokens
        self.steps = 0
        self.started = time.time()

    def add(self, stats: StepStats) -> None:
        # The loss stays a device tensor (StepStats.loss_sum_t): adding it reads nothing back;
        # the token counts were made on the host at collate time.
        for i, value in enumerate((stats.loss_sum_t, stats.tokens, stats.padded_tokens)):
            self.sums[i] = self.sums[i] + value
        self.steps += 1

    def read(self) -> dict[str, float]:
        """Global figures; a collective, so every rank must call it."""
        totals = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(())
                              for v in self.sums])
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


class Trainer:
    """One rank of a training run: ``Trainer(cfg, run_dir, session).fit()``."""

    def __init__(self, cfg: Config, run_dir: Path, session: Session) -> None:
        self.cfg = cfg  # the run's config, as checkpoints record it (accumulate at max_workers)
        self.run_dir = Path(run_dir)
        self.session = session
        self.rank, self.world, self.device = session.rank, session.world, session.device
        # A group smaller than max_workers accumulates more, so a step keeps its token budget.
        self.accumulate = cfg.train.accumulate_at(self.world)

        prepared = PreparedData.from_config(cfg.data)
        self.manifest = prepared.manifest
        self.src, self.tgt = prepared.train_arrays()
        self.spm = spm_files(prepared.spm_model(cfg.data.src_lang), prepared.spm_model(cfg.data.tgt_lang))
        self.vocab_size = prepared.vocab_sizes
        budget = batch_budget(cfg)  # data.max_tokens etc., or train.batch_sentences divided up
        self.sampler = BucketBatchSampler(
            self.src.lengths, self.tgt.lengths, budget.max_tokens, num_replicas=self.world, rank=self.rank,
            seed=cfg.train.seed, pool_batches=budget.pool_batches, max_sentences=budget.max_sentences,
            bucketing=cfg.data.bucketing,
        )

        resume = self._resume_source()
        # ZeRO partitions written by another number of ranks: a universal copy to load.
        universal = (universal_for(resume, zero_stage(cfg), self.world, self.run_dir, self.rank,
                                   say=say if self.rank == 0 else lambda _: None)
                     if resume is not None and cfg.train.backend == "deepspeed" else None)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = build_model(cfg.model, self.vocab_size["src"], self.vocab_size["tgt"], pad_id=PAD_ID).to(self.device)
        engine_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, accumulate=self.accumulate))
        self.engine = build_engine(engine_cfg, model, self.device, wrap=session.wrap, universal=universal)

        self.step, self.epoch = 0, 0
        self.sampler_state = self.sampler.state_dict()  # after the last trained group
        self.wandb_id: Optional[str] = None
        self.resumed_from: Optional[Path] = None
        if resume is not None:
            self._resume(resume, universal)

        self.checkpoints = CheckpointPolicy(cfg.train.checkpoint_every, cfg.train.max_steps)
        self.stop = StopPolicy(cfg.train.max_steps, cfg.train.max_minutes)
        self.streak = NonfiniteStreak(cfg.train.max_nonfinite_steps)
        self.budget = TimeBudget(cfg.train.max_minutes)
        self.preemption = PreemptionWatch(cfg.train.preemption_check_every)

    # ---- state -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs. Rank 0's goes into state.pt, without "rng",
        which every rank keeps in its own file; DeepSpeed's optimizer state is in its
        own folder of the checkpoint (see :meth:`save`)."""
        return {
            **self.engine.state_for_checkpoint(),
            "sampler": self.sampler_state, "step": self.step, "epoch": self.epoch, "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any], directory: Optional[Path] = None) -> None:
        """Restore :meth:`state_dict` (DeepSpeed: ``directory`` is the checkpoint's)."""
        self.engine.load(state, directory)
        self.sampler.load_state_dict(state["sampler"])
        self.sampler_state = self.sampler.state_dict()
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        if state.get("rng") is not None:  # none when resuming on more ranks than were saved
            set_rng_state(state["rng"])

    def _resume_source(self) -> Optional[Path]:
        """The checkpoint to resume from: the newest complete one, whoever knows of it.

        Ray registers a reported checkpoint when its controller next polls (every 2 s
        by default): a worker that dies just after reporting can leave Ray resuming
        from an older checkpoint, or from none, although a newer one is on disk. The
        run directory (local or a shared mount; the driver refuses URIs) is therefore
        scanned too, and a corrupt or incomplete checkpoint is skipped with a warning.
        Rank 0 decides and tells the others, so every rank loads the same one.
        """
        choice: list[Optional[str]] = [None]
        if self.rank == 0:
            reported = self.session.reported_checkpoint()
            newest = newest_valid_checkpoint(self.run_dir)
            if newest is not None and (reported is None or checkpoint_step(reported) < checkpoint_step(newest)):
                if reported is not None:
                    say(f"[train] Ray's latest checkpoint is {reported.name}; {newest.name} on disk is newer")
                choice[0] = str(newest)
            elif reported is not None:
                choice[0] = str(reported)
        if self.world > 1:
            dist.broadcast_object_list(choice, src=0)
        return Path(choice[0]) if choice[0] else None

    def _resume(self, directory: Path, universal: Optional[Path]) -> None:
        ckpt = load_checkpoint(directory, map_location=self.device)
        self.load_state_dict(ckpt.state | {"rng": load_rng(directory, self.rank)}, directory)
        remove_universal(universal, self.rank)
        self.wandb_id = ckpt.meta.get(META_WANDB_ID)
        self.resumed_from = directory
        if self.rank == 0:
            say(f"[train] resumed from {directory.name} at step {self.step}, epoch {self.epoch}")
            saved_world = int(ckpt.meta.get(META_WORLD_SIZE, self.world))
            if saved_world != self.world:
                say(f"[train] world size {saved_world} -> {self.world}: the rest of epoch {self.epoch} is re-sharded "
                    f"over {self.world} rank(s) ({len(self.sampler) - self.sampler.position} batches each), nothing "
                    "trained twice but the steps since the checkpoint")

    # ---- the loop ------------------------------------------------------------------

    def fit(self) -> str:
        """Train until a policy says stop; returns why."""
        wandb_run, batch_log = self._start()
        meter = Meter(self.device)
        loader = Prefetcher(step_groups(self.sampler, self.accumulate, self.epoch, self.cfg.train.max_epochs),
                            self.src, self.tgt, self.device)
        done = self.step >= self.cfg.train.max_steps  # a rerun of a finished run trains nothing
        group = None if done else loader.next()
        reason = f"train.max_steps={self.cfg.train.max_steps} reached" if done else None
        self.budget.start()
        try:
            while group is not None and reason is None:
                faults.maybe_kill(self.step + 1, self.rank, say)
                self.engine.poison_loss = faults.nan_injected(self.step + 1)
                stats = self.engine.train_step(group.batches)
                upcoming = loader.next()  # the next step's batches, while the device works on this one
                self.step += 1
                self.epoch, self.sampler_state = group.epoch, group.sampler_state
                meter.add(stats)
                if batch_log is not None:
                    self._log_batches(batch_log, group)

                facts = agree(stats.finite_t, self.budget.spent(), self.rank, self.device)
                if self.streak.update(facts.nonfinite) and self.rank == 0:
                    say(f"[train] step {self.step}: non-finite loss or gradient, update skipped "
                        f"({self.streak.streak} in a row)")
                if self.step % self.cfg.logging.log_every == 0:
                    self._log(meter.read(), stats, wandb_run)  # a collective: every rank reads
                    meter.reset()
                reason = self.stop.reason(self.step, facts, self.streak)
                if self.streak.tripped:
                    self._report_nonfinite()
                    break
                preempted = self._preempted()
                last = upcoming is None  # train.max_epochs: no batch left
                if self.checkpoints.due(self.step, facts.out_of_time, preempted, last) and self._checkpointable():
                    self.save(wandb_run.id if wandb_run is not None else self.wandb_id)
                    reason = self.session.stop_reason() or reason
                group = upcoming
        finally:
            if batch_log is not None:
                batch_log.close()
            if wandb_run is not None:
                wandb_run.finish()
        reason = reason or f"train.max_epochs={self.cfg.train.max_epochs} reached"
        if self.rank == 0:
            say(f"[train] stopping at step {self.step}: {reason}")
        return reason

    def _start(self) -> tuple[Optional[Any], Optional[Any]]:
        """Run directory, W&B (rank 0), the batch log, and the opening lines."""
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Nothing of this run writes yet: a hidden checkpoint directory is a killed writer's.
            for name in clear_stale_temporaries(self.run_dir):
                say(f"[train] removed {name}, a checkpoint a killed writer left unfinished")
        if self.world > 1:
            dist.barrier()
        wandb_run = start_wandb(self.cfg, self.run_dir, self.wandb_id) if self.rank == 0 else None
        batch_log = None
        if self.cfg.train.log_batches:  # 'step epoch pair-ids...' per batch, appended across restarts
            path = self.run_dir / "batches" / f"rank{self.rank}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            batch_log = open(path, "a", encoding="utf-8")
        if self.rank == 0:
            params = sum(p.numel() for p in self.engine.module.parameters())
            say(f"[train] {self.cfg.train.backend} on {self.world} worker(s) ({self.device.type}), "
                f"{params / 1e6:.2f}M parameters, {len(self.sampler)} batches per rank per epoch, padding efficiency "
                f"{self.sampler.padding_efficiency():.3f}, precision {self.cfg.train.precision}, "
                f"accumulate {self.accumulate}")
            if self.cfg.train.elastic or self.world != self.cfg.train.max_workers:
                say(self._effective_batch_line())
        return wandb_run, batch_log

    def _effective_batch_line(self) -> str:
        """How the effective batch was kept at this world size."""
        train = self.cfg.train
        if train.batch_sentences is not None:
            have = update_sentences(self.cfg, self.world)
            how = ("train.batch_sentences" if have == train.batch_sentences
                   else f"not the configured {train.batch_sentences}: {self.world} does not divide it")
            return (f"[train] world size {self.world}: accumulating {self.accumulate} micro-batch(es) of "
                    f"{batch_budget(self.cfg).max_sentences} sentences per rank per step = {have} sentences per step, {how}")
        want, have = self.cfg.step_token_budget(), self.cfg.step_token_budget(self.world)
        how = "the configured effective batch" if have == want else f"not the configured {want}: {self.world} does not divide it"
        return (f"[train] world size {self.world} of {train.min_workers}-{train.max_workers}: accumulating "
                f"{self.accumulate} micro-batch(es) per rank per step = {have} tokens per step, {how}")

    def _preempted(self) -> bool:
        """Ask (at the same steps on every rank) whether a node is being drained: checkpoint at once."""
        if not self.preemption.due(self.step):
            return False
        notice = self.session.preemption_notice()
        if notice is None:
            return False
        self.preemption.noticed = True  # one just-in-time checkpoint per notice
        if self.rank == 0:
            say(f"[train] {notice}: checkpointing at step {self.step}")
        return True

    def _checkpointable(self) -> bool:
        """Never checkpoint from a non-finite state: during a streak of skipped steps, or with
        non-finite weights (every rank holds the full weights, so all ranks agree). One host
        read for all parameters."""
        if self.streak.streak == 0 and bool(torch.stack([torch.isfinite(p).all()
                                                         for p in self.engine.module.parameters()]).all()):
            return True
        if self.rank == 0:
            say(f"[train] step {self.step}: no checkpoint, the training state is not finite")
        return False

    def save(self, wandb_id: Optional[str] = None) -> None:
        """Write checkpoint_<step>: rank 0 the checkpoint proper (state.pt with full
        weights, meta.json with checksums, the sentencepiece models); every rank its RNG
        states and, for DeepSpeed, its optimizer partition; each rank last its manifest."""
        state = self.state_dict()
        rng = state.pop("rng")
        name = checkpoint_name(self.step)
        with self.session.publish(name, reported_metrics(self.step, self.epoch)) as directory:
            if self.rank == 0:
                save_checkpoint(
                    directory, state, step=self.step, config=self.cfg.to_dict(),
                    vocab_sha256=self.manifest["spm_sha256"],
                    extra_meta={
                        META_VOCAB_SIZE: self.vocab_size, META_EPOCH: self.epoch, META_WANDB_ID: wandb_id,
                        META_WORLD_SIZE: self.world,
                        # Each rank's list of its files with checksums (see distnmt/checkpoint.py).
                        META_REQUIRED: [rank_manifest_name(r) for r in range(self.world)],
                    },
                    extra_files=self.spm,
                )
            self.engine.save_sharded(directory)
            save_rng(directory, self.rank, rng)
            write_rank_manifest(directory, self.rank)  # last: it vouches for this rank's files

    # ---- what the loop writes --------------------------------------------------------

    def _log_batches(self, batch_log: Any, group: StepGroup) -> None:
        for batch in group.batches:
            batch_log.write(f"{self.step} {self.epoch} {' '.join(map(str, batch.indices))}\n")
        batch_log.flush()

    def _log(self, metrics: dict[str, float], last: StepStats, wandb_run: Optional[Any]) -> None:
        """A progress line, a line of <run_dir>/metrics.jsonl, and W&B (rank 0 only)."""
        if self.rank != 0:
            return
        left = (len(self.sampler) - self.sampler_state["position"]) / self.accumulate
        eta_s = left * metrics["step_time_s"]
        metrics = metrics | {"world_size": self.world, "accumulate": self.accumulate}
        lr, grad_norm, loss_scale = float(last.lr), float(last.grad_norm), float(last.loss_scale)
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # The same figures W&B gets, locally.
        append_line(self.run_dir / "metrics.jsonl", json.dumps({
            "step": self.step, "epoch": self.epoch, "time": time.time(), "lr": lr, "grad_norm": grad_norm,
            "loss_scale": loss_scale, "peak_rss_mib": rss_mib, **metrics}))
        say(f"[train] step {self.step}/{self.cfg.train.max_steps} epoch {self.epoch} | loss {metrics['loss']:.3f} "
            f"| ppl {metrics['ppl']:.1f} | {metrics['tokens_per_s']:.0f} tgt tok/s "
            f"| padding eff {metrics['target_padding_efficiency']:.3f} | lr {lr:.2e} "
            f"| grad norm {grad_norm:.2f} | {self.world} worker(s) | epoch ETA {eta_s / 60:.1f} min")
        if wandb_run is not None:
            record = {f"train/{k}": v for k, v in metrics.items()}
            record |= {"train/lr": lr, "train/grad_norm": grad_norm, "train/loss_scale": loss_scale,
                       "train/peak_rss_mib": rss_mib, "epoch": self.epoch}
            if torch.cuda.is_available():
                record["train/gpu_peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
            wandb_run.log(record, step=self.step)

    def _report_nonfinite(self) -> None:
        """Tell the driver why training stops, in a file of the run directory: Ray's result
        carries only the metrics of checkpoints, and raising would make Ray retry the run."""
        if self.rank != 0:
            return
        message = (
            f"training stopped at step {self.step}: loss or gradients non-finite for {self.streak.streak} "
            f"consecutive steps (train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); "
            "try a lower optim.lr or bf16 instead of fp16"
        )
        say(f"[train] {message}")
        write_nonfinite(self.run_dir, self.step, message)
