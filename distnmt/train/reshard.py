"""DeepSpeed ZeRO checkpoints resumed on another number of ranks (elastic training).

ZeRO-1 and ZeRO-2 split the fp32 master weights and Adam's moments across the
ranks that wrote a checkpoint; DeepSpeed 0.19.8 refuses to load those partitions
on another data-parallel world size. Its *universal checkpoint* is the way round:
``deepspeed.checkpoint.ds_to_universal`` merges the partitions into one file per
parameter and optimizer state, and an engine started with
``checkpoint.load_universal`` re-partitions them for its own world size. Tested
here on CPU (2 -> 1 and 1 -> 2 ranks, ZeRO-1 and ZeRO-2): the weights and Adam
moments each rank holds afterwards equal the matching slice of the saved ones.

ZeRO-3 also partitions the weights; its conversion is not tested here, so a
ZeRO-3 run refuses to change its world size instead.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from distnmt.checkpoint import DEEPSPEED_TAG, deepspeed_dir, saved_world_size

UNIVERSAL_DIR = "universal"  # <run_dir>/universal/<checkpoint name>/: converted copies, removed once loaded


def universal_for(checkpoint: Path, stage: int, world: int, run_dir: Path, rank: int, say=print) -> Optional[Path]:
    """A universal copy of ``checkpoint``'s DeepSpeed state when ``world`` differs from its writers'.

    None when the world size is the same (load the checkpoint as it is), or for
    stage 0, whose optimizer state is not partitioned. Rank 0 converts (once: a
    finished conversion is reused by a restarted group) while the others wait at a
    barrier; every rank then loads from the returned directory, which has DEEPSPEED_TAG.
    """
    saved = saved_world_size(checkpoint)
    if saved is None or saved == world or stage == 0:
        return None
    if stage == 3:
        raise RuntimeError(
            f"{checkpoint}: written by {saved} ZeRO-3 rank(s), resumed on {world}: changing the world size is "
            "supported for ZeRO-1 and ZeRO-2 only; resume with the same train.workers (docs/ELASTIC.md)"
        )
    out = run_dir / UNIVERSAL_DIR / checkpoint.name
    if rank == 0 and not (out / "done").exists():
        started = time.time()
        _convert(deepspeed_dir(checkpoint) / DEEPSPEED_TAG, out, DEEPSPEED_TAG)
        say(f"[train] {checkpoint.name}: ZeRO-{stage} state of {saved} rank(s) converted to a universal "
            f"checkpoint for {world} rank(s) in {time.time() - started:.1f} s")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out


def _convert(source: Path, out: Path, tag: str) -> None:
    """Run DeepSpeed's converter into a temporary sibling, then rename: never half a copy."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    command = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
        "--output_folder", str(tmp / tag),
        # Our checkpoints carry no Megatron-style parameter patterns: plain data parallelism.
        "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{source}: DeepSpeed's universal checkpoint conversion failed: {last}")
    (tmp / "done").write_text("converted\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def remove_universal(directory: Optional[Path], rank: int) -> None:
    """Once every rank has loaded it, the converted copy goes (it can be as big as the model x 3)."""
    if directory is None:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
