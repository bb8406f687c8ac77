"""Reliability without Ray (issue 9): checkpoints cut short, corrupted, killed or
failing while written; the non-finite-loss guard of the DDP engine; checks a rerun
makes before starting Ray; bad input to translate. Real files, real processes,
real sentencepiece models and (untrained, tiny) RNNsearch checkpoints.
The Ray-level faults are in tests/integration/test_reliability_ray.py."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from distnmt.checkpoint import (
    CheckpointError,
    load_checkpoint,
    newest_valid_checkpoint,
    rank_manifest_name,
    read_meta,
    save_checkpoint,
    verify_checkpoint,
    write_rank_manifest,
)
from distnmt.cli import main
from distnmt.config import ConfigError, DataConfig, load_config
from distnmt.data.prepare import load_manifest, prepare
from distnmt.data.tokenizer import PAD_ID, Tokenizer
from distnmt.checkpoint import SRC_SPM, TGT_SPM
from distnmt.evaluate.translator import translator_from_checkpoint
from distnmt.model.build import build_model
from distnmt.orchestrate import preflight
from distnmt.train.engine import DDPEngine

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.embed_size=16", "model.hidden_size=24", "model.align_size=24", "model.maxout_size=16",
        "data.max_len=30", "data.max_tokens=600", "data.vocab_size=800", "optim.name=adam", "optim.lr=0.01",
        "train.precision=fp32", "eval.beam_size=2", "eval.batch_sentences=8"]


# ----------------------------------------------------------------- checkpoints on disk


def _train_like_checkpoint(run_dir: Path, step: int, world: int = 2) -> list[Path]:
    """Each rank's part of a checkpoint as the training loop writes it (rank 0: state.pt,
    meta.json, its RNG and ZeRO shard; rank r: RNG and shard; each: its rank manifest),
    in per-rank temporary directories. Returns those directories."""
    name = f"checkpoint_{step:08d}"
    parts = []
    for rank in range(world):
        directory = run_dir.parent / f".parts-{step}-rank{rank}" / name
        if rank == 0:
            save_checkpoint(directory, {"model": {"w": torch.full((64, 64), float(step))}, "step": step}, step=step,
                            config={"model": {"hidden_size": 24}}, vocab_sha256={"en": "a", "fr": "b"},
                            extra_meta={"required": [rank_manifest_name(r) for r in range(world)]})
        shard = directory / "deepspeed/state" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        shard.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"exp_avg": torch.randn(128, 128)}, shard)
        (directory / "rng").mkdir(exist_ok=True)
        torch.save({"torch": torch.get_rng_state()}, directory / "rng" / f"rank{rank}.pt")
        write_rank_manifest(directory, rank)
        parts.append(directory)
    return parts


def _copy_plan(parts: list[Path]) -> list[tuple[Path, str]]:
    """Every (source part, relative file) Ray copies into storage, in Ray's order of ranks."""
    return [(part, p.relative_to(part).as_posix()) for part in parts for p in sorted(part.rglob("*")) if p.is_file()]


def test_a_checkpoint_copy_cut_short_anywhere_is_never_taken_as_valid(tmp_path: Path) -> None:
    """Ray copies every rank's directory into the run directory file by file; a kill
    or full disk can stop it after any file, or inside one. Whatever order the files
    come in, only the complete copy verifies, and the previous checkpoint is used."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for part in _train_like_checkpoint(run_dir, 10):
        shutil.copytree(part, run_dir / part.name, dirs_exist_ok=True)
    plan = _copy_plan(_train_like_checkpoint(run_dir, 20))
    target = run_dir / "checkpoint_00000020"
    orders = [plan, plan[::-1], *(random.Random(seed).sample(plan, len(plan)) for seed in range(3))]
    for order in orders:
        for cut in range(len(order)):
            for partial_last in (False, True):
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir()  # the directory comes first, then its files
                for source, name in order[:cut]:
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source / name, target / name)
                source, name = order[cut]
                if partial_last:  # the file being copied when it stopped, half written
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    data = (source / name).read_bytes()
                    (target / name).write_bytes(data[: len(data) // 2])
                with pytest.warns(UserWarning, match="skipping checkpoint checkpoint_00000020: "):
                    assert newest_valid_checkpoint(run_dir) == run_dir / "checkpoint_00000010", (cut, name)
        # The whole copy, in any order, is a valid checkpoint.
        for source, name in order:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert newest_valid_checkpoint(run_dir) == target


@pytest.mark.parametrize("damage", ["truncate state.pt", "flip a byte of a ZeRO shard", "truncate meta.json",
                                    "delete a rank manifest", "garble a rank manifest"])
def test_a_corrupted_newest_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path: Path, damage: str) -> None:
    run_dir = tmp_path / "run"
    for step in (10, 20):
        for part in _train_like_checkpoint(run_dir, step):
            shutil.copytree(part, run_dir / part.name, dirs_exist_ok=True)
    newest = run_dir / "checkpoint_00000020"
    if damage == "truncate state.pt":
        (newest / "state.pt").write_bytes((newest / "state.pt").read_bytes()[:1000])
    elif damage == "flip a byte of a ZeRO shard":
        shard = newest / "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate meta.json":
        (newest / "meta.json").write_text((newest / "meta.json").read_text()[:50])
    elif damage == "delete a rank manifest":
        (newest / rank_manifest_name(1)).unlink()
    else:
        (newest / rank_manifest_name(0)).write_text("{\"files\": ")
    with pytest.warns(UserWarning, match=r"skipping checkpoint checkpoint_00000020: .*checkpoint_00000020") as caught:
        assert newest_valid_checkpoint(run_dir) == run_dir / "checkpoint_00000010"
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert load_checkpoint(run_dir / "checkpoint_00000010").step == 10


_WRITER = """
import shutil, sys, time, torch
from pathlib import Path
from distnmt.checkpoint import save_checkpoint
target, ready, spm = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
real_copy = shutil.copyfile
def copy_then_hang(src, dst, **kw):
    real_copy(src, dst, **kw)
    ready.write_text("state.pt written, copying the sentencepiece model")
    time.sleep(600)  # killed here, in the middle of the checkpoint
shutil.copyfile = copy_then_hang
save_checkpoint(target, {"model": {"w": torch.randn(256, 256)}, "step": 20}, step=20, config={},
                vocab_sha256={}, extra_files={"spm.src.model": spm})
"""


def test_a_process_killed_while_writing_leaves_no_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    spm = tmp_path / "spm.model"
    spm.write_bytes(b"x" * 1000)
    save_checkpoint(run_dir / "checkpoint_00000010", {"step": 10}, step=10, config={}, vocab_sha256={})
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(run_dir / "checkpoint_00000020"), str(ready), str(spm)],
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 120
        while not ready.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"the writer never got to the middle of its checkpoint (exit {child.poll()})"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    # The half-written checkpoint is a hidden temporary directory, never a checkpoint_* one.
    leftovers = [p.name for p in run_dir.iterdir()]
    assert "checkpoint_00000020" not in leftovers and any(n.startswith(".checkpoint_00000020.") for n in leftovers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert newest_valid_checkpoint(run_dir) == run_dir / "checkpoint_00000010"


_FULL_DISK = """
import resource, signal, sys, torch
from pathlib import Path
from distnmt.checkpoint import save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
try:
    save_checkpoint(Path(sys.argv[1]), {"model": {"w": torch.randn(512, 512)}}, step=20, config={}, vocab_sha256={})
except BaseException as err:
    print(f"write failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    sys.exit(3)
"""


def test_a_failing_write_leaves_no_checkpoint(tmp_path: Path) -> None:
    """A real failing write: the kernel refuses to grow a file past RLIMIT_FSIZE (EFBIG),
    which is what a full disk looks like to the writer (ENOSPC)."""
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoint_00000010", {"step": 10}, step=10, config={}, vocab_sha256={})
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, str(run_dir / "checkpoint_00000020")],
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and "write failed" in out.stdout, out.stdout + out.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_00000010"]  # the temp dir was removed
    assert newest_valid_checkpoint(run_dir) == run_dir / "checkpoint_00000010"


def test_rank_manifest_lists_only_what_meta_json_does_not(tmp_path: Path) -> None:
    parts = _train_like_checkpoint(tmp_path / "run", 10)
    rank0 = json.loads((parts[0] / rank_manifest_name(0)).read_text())["files"]
    rank1 = json.loads((parts[1] / rank_manifest_name(1)).read_text())["files"]
    assert sorted(rank0) == ["deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng/rank0.pt"]
    assert sorted(rank1) == ["deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng/rank1.pt"]
    with pytest.raises(CheckpointError, match=r"ranks/rank1.json: missing from checkpoint \(incomplete\)"):
        verify_checkpoint(parts[0])  # rank 0's part alone is not a checkpoint


# ----------------------------------------------------------------- non-finite loss


def _engine(precision: str) -> DDPEngine:
    cfg = load_config(None, TINY)
    # fp16 needs a GPU in a config (validate refuses it on CPU); the engine itself runs
    # fp16 autocast and the GradScaler on CPU, which is what this test needs.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    torch.manual_seed(0)
    return DDPEngine(cfg, build_model(cfg.model, 40, 40), torch.device("cpu"), wrap=lambda m: m)


def _batch():
    from distnmt.data.batch import Batch

    g = torch.Generator().manual_seed(3)
    src = torch.randint(4, 40, (3, 6), generator=g)
    tgt = torch.randint(4, 40, (3, 5), generator=g)
    return Batch(src=src, src_lengths=torch.tensor([6, 6, 6]), tgt_in=tgt, tgt_out=tgt, indices=[0, 1, 2])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_non_finite_step_is_skipped_and_training_goes_on(precision: str) -> None:
    engine = _engine(precision)
    engine.train_step([_batch()])  # a normal step first: optimizer state exists
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    optim_before = json.dumps(engine.optimizer.state_dict()["state"][0]["step"].tolist())
    scale_before = engine.scaler.get_scale() if engine.scaler.is_enabled() else None

    engine.poison_loss = True
    stats = engine.train_step([_batch()])
    assert not stats.finite
    for name, value in engine.module.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed by a skipped step"
    assert json.dumps(engine.optimizer.state_dict()["state"][0]["step"].tolist()) == optim_before
    if precision == "fp16":
        assert engine.scaler.get_scale() == scale_before / 2  # the loss scaler backed off

    engine.poison_loss = False
    stats = engine.train_step([_batch()])
    assert stats.finite and all(torch.isfinite(p).all() for p in engine.module.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in engine.module.state_dict().items())


def test_nan_injection_spec() -> None:
    from distnmt.train.faults import nan_injected as _nan_injected

    os.environ["DISTNMT_FAULT_NAN"] = "4,9-11,20-"
    try:
        assert [s for s in range(1, 25) if _nan_injected(s)] == [4, 9, 10, 11, 20, 21, 22, 23, 24]
    finally:
        del os.environ["DISTNMT_FAULT_NAN"]
    assert not _nan_injected(4)


def test_max_nonfinite_steps_is_checked() -> None:
    assert load_config(None, []).train.max_nonfinite_steps == 100
    with pytest.raises(ConfigError, match=r"^--set train.max_nonfinite_steps: 0 must be at least 1$"):
        load_config(None, ["train.max_nonfinite_steps=0"])


# ----------------------------------------------------------------- real checkpoints and data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(DataConfig(source_dir=str(shared_data), prepared_dir=str(out), vocab_size=800, max_len=30, max_train_pairs=1000), progress=False)
    return out


def _checkpoint(directory: Path, prepared: Path, *extra: str, vocab_sha256: dict | None = None) -> Path:
    """An untrained tiny RNNsearch checkpoint in the trainer's format."""
    cfg = load_config(None, [*TINY, f"data.prepared_dir={prepared}", *extra])
    src_tok, tgt_tok = Tokenizer(prepared / "spm.en.model"), Tokenizer(prepared / "spm.fr.model")
    torch.manual_seed(0)
    model = build_model(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size, pad_id=PAD_ID)
    return save_checkpoint(
        directory, {"model": model.state_dict(), "step": 10}, step=10, config=cfg.to_dict(),
        vocab_sha256=vocab_sha256 or load_manifest(prepared)["spm_sha256"],
        extra_meta={"vocab_size": {"src": src_tok.vocab_size, "tgt": tgt_tok.vocab_size}},
        extra_files={SRC_SPM: prepared / "spm.en.model", TGT_SPM: prepared / "spm.fr.model"},
    )


def _train_cli(prepared: Path, storage: Path, *sets: str) -> list[str]:
    args = ["train"]
    for text in [*TINY, f"data.prepared_dir={prepared}", f"train.storage_path={storage}", "train.name=run", *sets]:
        args += ["--set", text]
    return args


@pytest.mark.parametrize("sets, message", [
    (["train.backend=deepspeed", "train.deepspeed_config={zero4}"],
     r"zero4.json: zero_optimization.stage 4: DeepSpeed has stages 0, 1, 2 and 3$"),
    (["train.backend=deepspeed", "train.deepspeed_config={batch}"],
     r"batch.json: train_micro_batch_size_per_gpu is 8 but the YAML config implies 1 "),
    (["train.use_gpu=true"], r"train.use_gpu: True but this machine has no GPU"),
    (["eval.num_gpus=0.5"], r"eval.num_gpus: 0.5 but this machine has no GPU"),
    (["train.backend=deepspeed", "train.deepspeed_config={zero3}"],
     r"train.deepspeed_config: .*zero3.json is ZeRO-3, which distnmt does not support yet"),
], ids=["zero-stage-4", "deepspeed-json-contradicts-yaml", "gpu-without-gpu", "eval-gpu-without-gpu", "zero-stage-3"])
def test_train_refuses_before_starting_ray(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           sets: list[str], message: str) -> None:
    if any("gpu" in s for s in sets) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "zero4.json").write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    (tmp_path / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    (tmp_path / "batch.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    sets = [s.format(zero4=tmp_path / "zero4.json", zero3=tmp_path / "zero3.json", batch=tmp_path / "batch.json") for s in sets]
    started = time.time()
    assert main(_train_cli(prepared, tmp_path, *sets)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distnmt train: error: "), err
    assert __import__("re").search(message, err.strip()), err
    assert time.time() - started < 30  # refused up front, not after starting a cluster


def test_a_rerun_refuses_a_checkpoint_of_another_vocabulary_or_model(prepared: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    manifest = load_manifest(prepared)
    other_vocab = {lang: "0" * 64 for lang in manifest["spm_sha256"]}
    ckpt = _checkpoint(run_dir / "checkpoint_00000010", prepared, vocab_sha256=other_vocab)
    assert main(_train_cli(prepared, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{ckpt}: checkpoint was trained with a different vocabulary" in err, err

    shutil.rmtree(ckpt)
    ckpt = _checkpoint(run_dir / "checkpoint_00000010", prepared, "model.hidden_size=32")
    assert main(_train_cli(prepared, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{ckpt}: checkpoint has model.hidden_size=32 but the config says 24" in err, err

    # Settings that do not shape the weights may change on resume.
    cfg = load_config(None, [*TINY, "model.dropout=0.3", "model.init=torch", f"data.prepared_dir={prepared}"])
    shutil.rmtree(ckpt)
    ckpt = _checkpoint(run_dir / "checkpoint_00000010", prepared)
    preflight(cfg, run_dir, manifest)


def test_evaluate_refuses_data_prepared_with_another_vocabulary(prepared: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    other = {lang: "0" * 64 for lang in load_manifest(prepared)["spm_sha256"]}
    ckpt = _checkpoint(tmp_path / "checkpoint_00000010", prepared, vocab_sha256=other)
    assert main(["evaluate", str(ckpt), "--prepared", str(prepared), "--max-sentences", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{ckpt}: checkpoint was trained with a different vocabulary" in err, err


def test_a_checkpoint_of_another_format_version_is_refused(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "checkpoint_00000010", {"step": 10}, step=10, config={}, vocab_sha256={})
    meta = read_meta(ckpt)
    meta["version"] = 2
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"^{ckpt / 'meta.json'}: checkpoint format version 2, this distnmt reads 1$"):
        load_checkpoint(ckpt)


def test_checkpoints_that_are_not_usable_are_one_line_errors(prepared: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # A file, not a checkpoint directory.
    stray = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, stray)
    assert main(["translate", str(stray)]) == 2
    assert f"{stray}: not a distnmt checkpoint (no meta.json)" in capsys.readouterr().err
    # A checkpoint whose weights are of another model than its meta.json says.
    ckpt = _checkpoint(tmp_path / "checkpoint_00000010", prepared)
    meta = read_meta(ckpt)
    meta["config"]["model"]["hidden_size"] = 32
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"^{ckpt}: weights do not fit the model config in its meta.json \("):
        translator_from_checkpoint(ckpt)
    sys.stdin = io.TextIOWrapper(io.BytesIO(b"Hello.\n"))
    try:
        assert main(["translate", str(ckpt), "--quiet"]) == 2
    finally:
        sys.stdin = sys.__stdin__
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights do not fit the model config" in err


def test_translate_empty_long_and_non_utf8_input(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    ckpt = _checkpoint(tmp_path / "checkpoint_00000010", prepared, "eval.max_src_len=40")
    long_line = " ".join(["The European Parliament has adopted the resolution."] * 60)  # ~500 subwords
    lines = ["", "   ", "The house is small.", long_line, ""]
    sys.stdin = io.TextIOWrapper(io.BytesIO(("\n".join(lines) + "\n").encode()))
    try:
        with caplog.at_level(logging.WARNING):
            assert main(["translate", str(ckpt), "--quiet", "--beam", "1"]) == 0
    finally:
        sys.stdin = sys.__stdin__
    out = capsys.readouterr().out
    assert len(out.splitlines()) == len(lines)
    assert "1 of 5 sentences longer than 40 subwords were truncated" in caplog.text

    sys.stdin = io.TextIOWrapper(io.BytesIO(b"fine\nLatin-1: caf\xe9\n"))
    try:
        assert main(["translate", str(ckpt), "--quiet"]) == 2
    finally:
        sys.stdin = sys.__stdin__
    err = capsys.readouterr().err
    assert err == "distnmt translate: error: <stdin>:2: not valid UTF-8 (invalid continuation byte at byte 13 of the line)\n", err


# ----------------------------------------------------------------- the table


def test_every_test_docs_reliability_cites_exists() -> None:
    """docs/RELIABILITY.md names a test for each row; each must be a test of this suite.
    `::name` after `tests/x.py::y` is another test of the same file."""
    import re

    text = (REPO / "docs/RELIABILITY.md").read_text(encoding="utf-8")
    cited = 0
    for row in (line for line in text.splitlines() if line.startswith("| ") and "tests/" in line):
        last_file = None
        for match in re.finditer(r"`(?:(tests/[\w/]+\.py)(?:::(\w+))?|::(\w+))(?:\[[^\]]*\])?`", row):
            path, name, same_file_name = match.groups()
            last_file = path or last_file
            name = name or same_file_name
            assert last_file is not None, row
            source = (REPO / last_file).read_text(encoding="utf-8")
            if name is not None:
                assert re.search(rf"^def {name}\(", source, re.MULTILINE), f"{last_file}::{name} cited but not defined"
                cited += 1
    assert cited >= 50


def test_an_unscored_checkpoint_is_reported_with_a_strict_json_bleu() -> None:
    """Ray keeps its checkpoint list as JSON that turns NaN into null; a rerun restoring
    it could then not rank the next checkpoint. The placeholder BLEU is finite, valid
    strict JSON, and below any real score."""
    from distnmt.train.trainer import UNSCORED_BLEU, reported_metrics as _reported_metrics

    metrics = _reported_metrics(30, 2)
    assert json.loads(json.dumps(metrics, allow_nan=False)) == {"step": 30, "epoch": 2, "bleu": UNSCORED_BLEU}
    assert UNSCORED_BLEU < 0.0
