"""The one checkpoint format: written by train/, read by evaluate/ and translate.

This module is the only one that names checkpoint files (tests/test_imports.py
holds every other module to that). A run directory holds::

    checkpoint_<step:08d>/   one checkpoint (see below); listed by step
    .checkpoint_*            a writer's temporary directory: never a checkpoint;
                             one a killed writer left is cleared at the next start
    nonfinite.json           why training stopped on a non-finite loss

and a checkpoint is a directory::

    state.pt    torch.save of plain state dicts (model, optimizer, ...), loaded
                with weights_only=True so a checkpoint can never run code
    meta.json   format name and version, config, step, vocabulary hashes and the
                sha256 of state.pt, so truncation or corruption is detected
    spm.src.model, spm.tgt.model   the sentencepiece models (a checkpoint alone
                translates)
    rng/rank<r>.pt     every rank's RNG states (CPU, accelerator, numpy, Python)
    deepspeed/state/   DeepSpeed's own checkpoint (ZeRO partitions), DeepSpeed runs only
    ranks/rank<r>.json each rank's checksums of the files it added

Both files are written into a temporary directory beside the target and the
directory is renamed into place, so a reader never sees half a checkpoint.

In training, Ray copies every rank's part into the run directory file by file,
which no rename can make atomic. Each rank therefore also writes
``ranks/rank<r>.json`` with the sha256 of every file it added (RNG state,
ZeRO partitions), and meta.json lists those manifests as required: a copy cut
short at any file fails :func:`verify_checkpoint` and is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from distnmt.io import sha256_file, write_json

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that read or write tensors, not here: the CLI
# imports this module for CheckpointError, and its light commands (`distnmt cluster
# ...`, which every launch/ script runs, and `--help`) then start in 0.3 s, not 2.5 s.

FORMAT = "distnmt-checkpoint"
VERSION = 1
PREFIX = "checkpoint_"  # checkpoint_<step:08d>
STATE_FILE = "state.pt"
META_FILE = "meta.json"
RANKS_DIR = "ranks"
RNG_DIR = "rng"
SRC_SPM = "spm.src.model"  # the source-side sentencepiece model, copied in
TGT_SPM = "spm.tgt.model"
DEEPSPEED_SUBDIR = "deepspeed"  # DeepSpeed's save_checkpoint(<checkpoint>/deepspeed, tag=DEEPSPEED_TAG)
DEEPSPEED_TAG = "state"
NONFINITE_FILE = "nonfinite.json"  # in the run directory when training stopped on a non-finite loss
# meta.json keys beyond the format's own (format, version, step, config, vocab_sha256, files):
META_REQUIRED = "required"        # rank manifests that must be present (written by other ranks)
META_WORLD_SIZE = "world_size"    # ranks that wrote the checkpoint (elastic resume re-shards)
META_EPOCH = "epoch"
META_VOCAB_SIZE = "vocab_size"
META_WANDB_ID = "wandb_run_id"    # a resumed run logs to the same W&B run
# Model keys that do not shape the weights: a run may resume with other values.
MODEL_KEYS_FREE_ON_RESUME = ("dropout", "init", "compile")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path."""


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint of ``step``: zero-padded, so names sort by step."""
    return f"{PREFIX}{step:08d}"


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is a checkpoint directory's name (not a writer's hidden temporary)."""
    return name.startswith(PREFIX) and name[len(PREFIX):].isdigit()


def checkpoint_step(path: Path | str) -> int:
    """The step in a ``checkpoint_<step>`` directory name (-1 if it has none)."""
    digits = Path(path).name.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else -1


def list_checkpoints(run_dir: Path, with_meta: bool = True) -> list[Path]:
    """The ``checkpoint_*`` directories of ``run_dir`` by step, oldest first.

    ``with_meta``: only those whose meta.json exists (Ray may still be copying the
    others in); unverified either way: :func:`newest_valid_checkpoint` verifies.
    """
    found = [p for p in Path(run_dir).glob(f"{PREFIX}*") if p.is_dir() and is_checkpoint_name(p.name)]
    if with_meta:
        found = [p for p in found if (p / META_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def meta_path(directory: Path | str) -> Path:
    """A checkpoint's meta.json (its mtime is when the checkpoint was complete)."""
    return Path(directory) / META_FILE


def rng_path(directory: Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its RNG states in a checkpoint."""
    return Path(directory) / RNG_DIR / f"rank{rank}.pt"


def save_rng(directory: Path, rank: int, state: dict[str, Any]) -> None:
    """Write this rank's RNG states (plain tensors, ints and lists: loadable with weights_only)."""
    path = rng_path(directory, rank)
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def load_rng(directory: Path, rank: int) -> Optional[dict[str, Any]]:
    """This rank's RNG states, or None when the checkpoint has none for it (it was
    written by fewer ranks: an elastic group that grew)."""
    import torch

    path = rng_path(directory, rank)
    return torch.load(path, weights_only=True) if path.exists() else None


def spm_files(src_model: Path, tgt_model: Path) -> dict[str, Path]:
    """The ``extra_files`` of :func:`save_checkpoint` that copy the sentencepiece models in."""
    return {SRC_SPM: Path(src_model), TGT_SPM: Path(tgt_model)}


def spm_paths(directory: Path) -> tuple[Path, Path]:
    """A checkpoint's (source, target) sentencepiece models."""
    return Path(directory) / SRC_SPM, Path(directory) / TGT_SPM


def deepspeed_dir(directory: Path) -> Path:
    """The folder DeepSpeed's own checkpoint goes into (load and save with tag DEEPSPEED_TAG)."""
    return Path(directory) / DEEPSPEED_SUBDIR


def nonfinite_path(run_dir: Path) -> Path:
    """The file that says why training stopped on a non-finite loss (the driver reads it)."""
    return Path(run_dir) / NONFINITE_FILE


def write_nonfinite(run_dir: Path, step: int, message: str) -> None:
    write_json(nonfinite_path(run_dir), {"step": step, "message": message})


def saved_world_size(directory: Path) -> Optional[int]:
    """The number of ranks that wrote a checkpoint (meta.json), or None if it does not say."""
    try:
        meta = json.loads(meta_path(directory).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return int(meta[META_WORLD_SIZE]) if META_WORLD_SIZE in meta else None


def staging_dir(run_dir: Path, name: str) -> Path:
    """A hidden directory to assemble checkpoint ``name`` in before it is renamed into place."""
    return Path(run_dir) / f".{name}.staging"


def clear_stale_temporaries(run_dir: Path) -> list[str]:
    """Remove every hidden ``.checkpoint_*`` directory a killed writer left in ``run_dir``.

    Called once when training starts, before any writer of this run can be at work
    (the writers are this run's ranks): whatever is there was cut short. Returns
    the names removed.
    """
    removed = []
    for path in Path(run_dir).glob(f".*{PREFIX}*"):  # staging dirs and save_checkpoint's temporaries
        if path.is_dir() and path.name.lstrip(".").startswith(PREFIX):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return sorted(removed)


def newest_valid_checkpoint(run_dir: Path) -> Optional[Path]:
    """The highest-step ``checkpoint_*`` in ``run_dir`` that verifies; broken ones are skipped with a warning."""
    candidates = list(reversed(list_checkpoints(run_dir, with_meta=False)))
    for path in candidates:
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint {path.name}: {err}", stacklevel=2)
    return None


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns."""

    path: Path
    meta: dict[str, Any]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def save_checkpoint(
    directory: Path,
    state: dict[str, Any],
    *,
    step: int,
    config: dict[str, Any],
    vocab_sha256: dict[str, str],
    extra_meta: Optional[dict[str, Any]] = None,
    extra_files: Optional[dict[str, Path]] = None,
) -> Path:
    """Write ``state`` and its metadata to ``directory`` atomically.

    ``extra_files`` (name -> source path) are copied in and checksummed too; the
    trainer stores the sentencepiece models this way so that a checkpoint alone
    is enough to translate. ``directory`` must not exist yet or be empty.
    """
    import torch

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        torch.save(state, tmp / STATE_FILE)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
        files = [STATE_FILE, *(extra_files or {})]
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "config": config,
            "vocab_sha256": vocab_sha256,
            "files": {name: sha256_file(tmp / name) for name in files},
            **(extra_meta or {}),
        }
        write_json(tmp / META_FILE, meta)
        if directory.exists():
            if any(directory.iterdir()):
                raise CheckpointError(f"{directory}: refusing to overwrite a non-empty directory")
            directory.rmdir()
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_meta(directory: Path) -> dict[str, Any]:
    """Read and check ``meta.json``; CheckpointError if this is not a distnmt checkpoint."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{directory}: not a distnmt checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a distnmt checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: checkpoint format version {meta.get('version')!r}, this distnmt reads {VERSION}")
    return meta


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check the metadata and every listed file's sha256; return the metadata."""
    directory = Path(directory)
    meta = read_meta(directory)
    for name, expected in meta.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from checkpoint")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted checkpoint)")
    for name in meta.get("required", []):
        # Files other ranks add after rank 0 wrote meta.json (RNG states, ZeRO
        # partitions): without them the checkpoint is incomplete.
        if not (directory / name).exists():
            raise CheckpointError(f"{directory / name}: missing from checkpoint (incomplete)")
        if name.startswith(f"{RANKS_DIR}/"):
            _verify_rank_manifest(directory, directory / name)
    return meta


def rank_manifest_name(rank: int) -> str:
    """Where rank ``rank`` lists the files it added to a checkpoint."""
    return f"{RANKS_DIR}/rank{rank}.json"


def write_rank_manifest(directory: Path, rank: int) -> str:
    """Checksum every file in this rank's copy of a checkpoint that meta.json does not cover.

    Called by every rank last, after all its files are written; returns the
    manifest's name relative to ``directory``.
    """
    directory = Path(directory)
    covered = {META_FILE}
    if (directory / META_FILE).is_file():  # rank 0's copy
        covered |= set(json.loads((directory / META_FILE).read_text(encoding="utf-8"))["files"])
    files = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and name not in covered and not name.startswith(f"{RANKS_DIR}/"):
            files[name] = sha256_file(path)
    name = rank_manifest_name(rank)
    write_json(directory / name, {"rank": rank, "files": files})
    return name


def _verify_rank_manifest(directory: Path, manifest: Path) -> None:
    """Every file a rank listed is present with its checksum."""
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        items = list(files.items())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{manifest}: unreadable rank manifest (truncated or corrupted checkpoint)") from None
    for name, expected in items:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from checkpoint (incomplete)")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted checkpoint)")


def load_checkpoint(directory: Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Verify checksums and load a checkpoint safely (weights_only)."""
    import torch

    directory = Path(directory)
    meta = verify_checkpoint(directory)
    state = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)
    return LoadedCheckpoint(path=directory, meta=meta, state=state)


def check_same_model(meta: dict[str, Any], model: dict[str, Any], where: Path) -> None:
    """Refuse to resume a checkpoint whose weights have other shapes than ``model`` (a config's model section)."""
    stored = meta.get("config", {}).get("model", {})
    for key, value in model.items():
        if key not in MODEL_KEYS_FREE_ON_RESUME and key in stored and stored[key] != value:
            raise CheckpointError(
                f"{where}: checkpoint has model.{key}={stored[key]!r} but the config says {value!r}; "
                "resume with the checkpoint's model config or use another train.name"
            )


def check_vocab(meta: dict[str, Any], vocab_sha256: dict[str, str], where: Path) -> None:
    """Refuse a checkpoint trained with other sentencepiece models than the data at hand."""
    stored = meta.get("vocab_sha256", {})
    if stored != vocab_sha256:
        raise CheckpointError(
            f"{where}: checkpoint was trained with a different vocabulary than the prepared data "
            f"(sentencepiece sha256 {stored} vs {vocab_sha256}); prepare the data it was trained on"
        )
