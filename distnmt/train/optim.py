"""Optimizers named in the config (the paper's Adadelta, and Adam/AdamW)."""

from __future__ import annotations

from typing import Iterable

import torch

from distnmt.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """A torch optimizer (not DeepSpeed's fused ones, which compile for minutes on CPU).

    ``fused``: torch's fused Adam/AdamW kernels (the DDP engine asks for them on CUDA):
    one kernel for all parameters, and the step can be skipped on a non-finite
    gradient without reading a flag back to the host. Adadelta has no fused kernel.
    """
    params = list(params)
    if cfg.name == "adadelta":
        # Paper: eps 1e-6, rho 0.95, lr 1.0 (Adadelta's own step size).
        return torch.optim.Adadelta(params, lr=cfg.lr, rho=cfg.rho, eps=cfg.eps, weight_decay=cfg.weight_decay)
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                fused=fused or None)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=fused or None)
