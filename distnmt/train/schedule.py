"""Learning-rate schedules named in the config, as LambdaLR multipliers of optim.lr."""

from __future__ import annotations

import math

import torch

from distnmt.config import OptimConfig


def lr_multiplier(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The factor applied to ``optim.lr`` before optimizer step ``step`` (0-based)."""
    warmup = cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)
    if cfg.schedule == "inverse_sqrt":
        # Linear warmup to the peak, then decay with 1/sqrt(step) (Vaswani et al.).
        if warmup > 0 and step + 1 < warmup:
            return (step + 1) / warmup
        return math.sqrt(max(warmup, 1) / (step + 1))
    # cosine: linear warmup, then half a cosine down to min_lr_ratio at total_steps.
    if warmup > 0 and step + 1 < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step + 1 - warmup) / max(1, total_steps - warmup))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose state (last_epoch = steps taken) goes into the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, total_steps))
