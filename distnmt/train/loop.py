"""The entry point Ray Train calls in every worker process (and, with
``train.workers: 0``, in the calling process: Ray Train's local mode).

It only sets the process up and hands over to the Trainer (train/trainer.py),
which runs the same way in one process without Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distnmt.config import config_from_dict
from distnmt.train.session import RaySession
from distnmt.train.trainer import Trainer


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """``loop_config``: the run's config (as a dict), its run directory, the evaluator
    actor's name and namespace (None: no early stopping), and whether Ray Train runs
    in local mode."""
    cfg = config_from_dict(loop_config["config"])
    # Two workers on two cores must not each spawn a thread per core.
    torch.set_num_threads(cfg.train.threads_per_worker)
    session = RaySession(Path(loop_config["run_dir"]), loop_config.get("evaluator"), loop_config.get("namespace"),
                         local=bool(loop_config.get("local")))
    Trainer(cfg, Path(loop_config["run_dir"]), session).fit()
