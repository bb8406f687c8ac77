"""Weights & Biases from rank 0 only (Ray Train V2 rejects the Tune logger callback).

``logging.wandb: online`` without WANDB_API_KEY (and no stored login) falls
back to offline, saying where the files are. A resumed run passes the W&B run
id stored in its checkpoint, so the dashboard shows one continuous run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

from distnmt.config import Config


def wandb_mode(requested: str) -> str:
    """'online' only when a key is available; never prompts for one."""
    if requested == "online" and not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists()):
        return "offline"
    return requested


def start_wandb(cfg: Config, run_dir: Path, run_id: Optional[str]) -> Optional[Any]:
    """A W&B run for this training run, or None when logging.wandb is disabled."""
    if cfg.logging.wandb == "disabled":
        return None
    import wandb  # late: slow to import, unused when disabled

    mode = wandb_mode(cfg.logging.wandb)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.logging.wandb_project, name=cfg.train.name, group=cfg.train.name,
        config=cfg.to_dict(), mode=mode, dir=str(run_dir),
        id=run_id, resume="allow",
    )
    if mode == "offline":
        sys.stdout.write(f"[train] W&B offline (no WANDB_API_KEY): files in {run.dir}; `wandb sync` uploads them\n")
        sys.stdout.flush()
    return run
