"""What a ``ray job submit`` of distnmt carries: the runtime_env (the code as working_dir,
big paths left out; the environment variables passed through) and the config paths
made absolute for the job."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


# Never uploaded with a job: version control, the virtual environment, data and
# everything runs produce. Ray refuses packages over 512 MiB and warns well before.
# gitignore syntax (Ray uses pathspec's gitwildmatch): a leading "/" anchors at the
# repository root, so "/data" leaves out the data folder but keeps distnmt/data/.
WORKING_DIR_EXCLUDES = [
    "/.git", "/.venv", "/data", "/prepared", "/runs", "/bench-results", "/wandb",
    "/build", "/dist", "__pycache__", "*.egg-info", ".pytest_cache", "*.pt", "*.ckpt",
]

# Forwarded to the job when set in the submitting shell (values never touch disk here).
DEFAULT_PASSTHROUGH = [
    "WANDB_API_KEY", "WANDB_MODE", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_BASE_URL",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
]

# Config keys holding paths a job opens, per command. Relative ones would resolve
# inside the job's private copy of the working dir, which Ray deletes afterwards.
PATH_KEYS = {
    "prepare": ("data.source_dir", "data.prepared_dir"),
    "train": ("data.prepared_dir", "train.storage_path"),
}


class ClusterError(Exception):
    """A user mistake or a cluster that would not start: one line, exit status 2."""


def runtime_env(working_dir: str, passthrough: list[str], fixed: dict[str, str]) -> dict[str, object]:
    """runtime_env for a distnmt job: the code as working_dir (big paths left out) and the
    environment variables named in ``passthrough`` that are set here, plus ``fixed``."""
    env_vars = {name: os.environ[name] for name in passthrough if os.environ.get(name)}
    env_vars.update(fixed)
    return {"working_dir": working_dir, "excludes": WORKING_DIR_EXCLUDES, "env_vars": env_vars}


def job_paths(config: str, distnmt_args: list[str], base: Path, local: bool, command: str = "train") -> list[str]:
    """``--set`` values that make the config's relative paths absolute (``base``-relative).

    For a local cluster the submitting machine's paths are the cluster's. For a remote
    one a relative path is an error: it must name shared storage on the cluster.
    """
    from distnmt.config import ConfigError, load_config

    sets = argparse.ArgumentParser(add_help=False)
    sets.add_argument("--set", dest="overrides", action="append", default=[])
    overrides = sets.parse_known_args(distnmt_args)[0].overrides
    try:
        cfg = load_config(Path(config), overrides)
    except ConfigError as err:
        raise ClusterError(str(err)) from None
    out = []
    for key in PATH_KEYS[command]:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None or "://" in str(value) or os.path.isabs(str(value)):
            continue  # None: e.g. prepare downloads; URIs go to Ray's storage layer
        if not local:
            raise ClusterError(f"{key}={value!r} is relative; on a cluster it must be on shared storage, "
                               f"e.g. --set {key}=/mnt/shared/...")
        out.append(f"{key}={(base / str(value)).resolve()}")
    return out
