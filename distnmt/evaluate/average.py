"""Checkpoint averaging: the mean of the model weights of the last N checkpoints.

Averaging the parameters of the last few checkpoints of a run usually gains a
little BLEU over the last one alone, at no training cost. The result is written
as an ordinary checkpoint (model weights, config, sentencepiece models; no
optimizer state), so ``distnmt evaluate`` and ``distnmt translate`` read it like
any other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distnmt.checkpoint import CheckpointError, load_checkpoint, meta_path, read_meta, save_checkpoint, spm_files, spm_paths


def last_checkpoints(checkpoint: Path, count: int) -> list[Path]:
    """``checkpoint`` and the ``count - 1`` checkpoints before it (by step) in the same directory."""
    checkpoint = Path(checkpoint)
    step = int(read_meta(checkpoint)["step"])
    steps: dict[Path, int] = {}
    for sibling in checkpoint.parent.iterdir():
        if sibling.is_dir() and meta_path(sibling).is_file():
            try:
                steps[sibling] = int(read_meta(sibling)["step"])
            except CheckpointError:
                continue  # not ours (another tool's folder): not a candidate
    earlier = sorted((p for p, s in steps.items() if s <= step), key=lambda p: steps[p])
    if len(earlier) < count:
        raise CheckpointError(
            f"{checkpoint}: averaging {count} checkpoints needs {count} up to step {step} in "
            f"{checkpoint.parent}, found {len(earlier)}"
        )
    return earlier[-count:]


def average_checkpoints(paths: list[Path], out_dir: Path) -> Path:
    """Write the checkpoint whose model weights are the mean of ``paths``'; returns its directory.

    Checkpoints of different models or vocabularies cannot be averaged. Weights are
    summed in float64 and cast back, so the order of the checkpoints does not matter.
    """
    if not paths:
        raise ValueError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    first_meta = None
    for path in paths:
        ckpt = load_checkpoint(Path(path))  # one at a time: each holds optimizer state too
        model = ckpt.state["model"]
        if first_meta is None:
            first_meta = ckpt.meta
            dtypes = {name: tensor.dtype for name, tensor in model.items()}
        else:
            _check_compatible(first_meta, ckpt.meta, Path(path))
            if set(model) != set(total):
                raise CheckpointError(f"{path}: its model has other parameters than {paths[0]}")
        for name, tensor in model.items():
            if tensor.is_floating_point():
                total[name] = total.get(name, 0) + tensor.double()
            else:
                total[name] = tensor  # integer buffers (none today) are taken from the last checkpoint
    averaged = {
        name: (tensor / len(paths)).to(dtypes[name]) if dtypes[name].is_floating_point else tensor
        for name, tensor in total.items()
    }
    last = Path(paths[-1])
    meta = read_meta(last)
    return save_checkpoint(
        Path(out_dir), {"model": averaged, "step": int(meta["step"])},
        step=int(meta["step"]), config=meta["config"], vocab_sha256=meta["vocab_sha256"],
        extra_meta={"vocab_size": meta["vocab_size"], "averaged_from": [Path(p).name for p in paths]},
        extra_files=spm_files(*spm_paths(last)),
    )


def _check_compatible(first: dict, other: dict, where: Path) -> None:
    """Same architecture and vocabulary, or averaging is meaningless."""
    if other["config"]["model"] != first["config"]["model"]:
        raise CheckpointError(f"{where}: model config differs from the other checkpoints'; cannot average")
    if other["vocab_sha256"] != first["vocab_sha256"]:
        raise CheckpointError(f"{where}: vocabulary differs from the other checkpoints'; cannot average")
