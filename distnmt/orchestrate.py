"""Orchestration: start Ray, the evaluator actor and the trainer; the end-of-run score.

This layer sits above train/ and evaluate/ (which never import each other):
``distnmt train`` and ``ray job submit -- distnmt train`` both end up in
:func:`run_training`. Ray is started locally unless an address is given
(``train.ray_address`` or the RAY_ADDRESS variable that ``ray job submit`` sets).

``train.workers: 0`` is Ray Train's local mode (``ScalingConfig(num_workers=0)``):
no Ray cluster at all, the training function runs in this process with the same
``ray.train`` calls, for debugging with a debugger or a profiler. The evaluator then
runs in this process too and scores the run's checkpoints after training (no early
stopping, no keep_checkpoints pruning, no worker restarts: those need the cluster).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import ray
import ray.train
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    ValidationConfig,
    ValidationTaskConfig,
)
from ray.train.torch import TorchTrainer

from distnmt.checkpoint import (
    check_same_model,
    check_vocab,
    list_checkpoints,
    newest_valid_checkpoint,
    nonfinite_path,
    read_meta,
)
from distnmt.cluster import route_local_mode_logs, start_or_join
from distnmt.cluster.process_group import NodeAddressTorchConfig
from distnmt.config import Config, ConfigError
from distnmt.data.prepared import PreparedData
from distnmt.evaluate.evaluator import Evaluator
from distnmt.evaluate.hook import score_with_evaluator
from distnmt.evaluate.records import FinalReport, ScoreRecord
from distnmt.train.engine import deepspeed_config, zero_stage
from distnmt.train.loop import train_loop_per_worker

NAMESPACE = "distnmt"


class TrainingError(RuntimeError):
    """Training ran but could not go on (e.g. the loss stayed non-finite); one line."""


def resolve_paths(cfg: Config) -> Config:
    """Make every path absolute: Ray workers do not share the driver's cwd."""
    data = dataclasses.replace(
        cfg.data,
        source_dir=str(Path(cfg.data.source_dir).resolve()) if cfg.data.source_dir else None,
        prepared_dir=str(Path(cfg.data.prepared_dir).resolve()),
    )
    storage = cfg.train.storage_path
    if "://" in storage:
        # The evaluator and rank 0 write scores, figures and metrics into the run
        # directory as files; a mounted shared filesystem is what works today.
        raise ConfigError(f"train.storage_path: {storage!r}: use a shared mount (NFS, EFS, Filestore), not a URI")
    storage = str(Path(storage).resolve())
    train = dataclasses.replace(cfg.train, storage_path=storage)
    return dataclasses.replace(cfg, data=data, train=train)


def check_elastic(cfg: Config) -> None:
    """Elastic DeepSpeed re-shards ZeRO-1/2 state (train/reshard.py); ZeRO-3 is refused up front."""
    if cfg.train.elastic and zero_stage(cfg) == 3:
        raise ConfigError(
            f"train.workers: {cfg.train.workers} is elastic but {cfg.train.deepspeed_config} is ZeRO-3: "
            "a changing world size is supported with ZeRO-0/1/2 and DDP only (docs/ELASTIC.md)"
        )


def check_zero_stage(cfg: Config) -> None:
    """ZeRO-3 is refused before Ray starts, elastic or not (see the comment below)."""
    if zero_stage(cfg) == 3:
        # The checkpoint gathers ZeRO-3's partitioned fp32 masters (engine.state_for_checkpoint),
        # but a 2-rank ZeRO-3 run on gloo aborts in a collective (tests/test_engine_zero.py):
        # until that is understood, refuse it here rather than write checkpoints nobody verified.
        raise ConfigError(
            f"train.deepspeed_config: {cfg.train.deepspeed_config} is ZeRO-3, which distnmt does not support yet "
            "(its checkpoints are not verified); use ZeRO-0/1/2 (configs/deepspeed/)"
        )


def start_evaluator(cfg: Config, run_dir: Path) -> tuple[Any, str]:
    """The evaluator actor, with its own resources, restarted by Ray if it dies."""
    # The run directory in the name: two runs called alike in different storage
    # paths can share a cluster without sharing an evaluator.
    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]
    name = f"distnmt-evaluator-{cfg.train.name}-{digest}"
    resources: dict[str, Any] = {"num_cpus": cfg.eval.num_cpus, "num_gpus": cfg.eval.num_gpus}
    actor = (
        ray.remote(Evaluator)
        # max_concurrency: the trainers' stop_reason() calls are answered while a
        # checkpoint is being decoded, so training never waits on evaluation.
        .options(name=name, namespace=NAMESPACE, max_restarts=-1, max_task_retries=-1, max_concurrency=4, **resources)
        .remote(cfg.to_dict(), cfg.data.prepared_dir, str(run_dir))
    )
    return actor, name


def build_local_trainer(cfg: Config, run_dir: Path) -> TorchTrainer:
    """Ray Train's local mode: the training function in this process, no cluster."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir), "evaluator": None,
                           "namespace": None, "local": True},
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(name=cfg.train.name, storage_path=cfg.train.storage_path),
    )


def build_trainer(cfg: Config, run_dir: Path, evaluator_name: str) -> TorchTrainer:
    """Ray Train's TorchTrainer with our loop, resources, storage and evaluator hook."""
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir), "evaluator": evaluator_name,
                           "namespace": NAMESPACE, "local": False},
        # The process group's rendezvous on the node's address only (127.0.0.1 in a local
        # cluster), not on every interface as torch's TCPStore would (cluster/process_group.py).
        torch_config=NodeAddressTorchConfig(),
        scaling_config=ScalingConfig(
            # [min, max]: Ray's elastic policy starts with what the cluster can hold (at
            # least min), restarts on fewer workers when a node is lost, and grows the
            # group every elastic_resize_interval_s when more fit (docs/ELASTIC.md).
            num_workers=(cfg.train.min_workers, cfg.train.max_workers) if cfg.train.elastic else cfg.train.max_workers,
            elastic_resize_monitor_interval_s=cfg.train.elastic_resize_interval_s,
            use_gpu=cfg.train.use_gpu, resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=cfg.train.name,
            storage_path=cfg.train.storage_path,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # With keep_checkpoints: the K best by dev BLEU (Ray re-ranks a checkpoint when
            # its evaluator score arrives) and always the newest; unscored ones are kept.
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute="bleu", checkpoint_score_order="max",
            ),
        ),
        validation_config=ValidationConfig(
            fn=score_with_evaluator,
            task_config=ValidationTaskConfig(fn_kwargs={"evaluator_name": evaluator_name, "namespace": NAMESPACE}),
            # The hook only waits on the actor, which holds the CPU it decodes with.
            ray_remote_kwargs={"num_cpus": 0},
        ),
    )


def run_training(cfg: Config) -> list[ScoreRecord]:
    """Train, have every checkpoint scored, print the final BLEU line; return the scores."""
    cfg = resolve_paths(cfg)
    manifest = PreparedData.from_config(cfg.data).manifest  # fail here, clearly, if `prepare` was not run
    check_elastic(cfg)
    check_zero_stage(cfg)
    run_dir = Path(cfg.train.storage_path) / cfg.train.name
    preflight(cfg, run_dir, manifest)
    if cfg.train.local_mode:
        return run_local(cfg, run_dir)
    started = time.time()
    # Joins the given cluster or starts a local loopback one; routes Ray's log lines.
    ray_handle = start_or_join(cfg, run_dir) if not ray.is_initialized() else None
    # After ray.init, which installs a SIGTERM handler of its own that aborts the process.
    previous_handler = _stop_on_sigterm()
    evaluator = None
    try:
        print(f"[distnmt] Ray ready in {time.time() - started:.1f} s; run directory {run_dir}", flush=True)
        if ray_handle is not None and ray_handle.log_path is not None:
            _name_ray_log(cfg, ray_handle.log_path)
        evaluator, evaluator_name = start_evaluator(cfg, run_dir)
        info = ray.get(evaluator.ready.remote())
        print(f"[distnmt] evaluator ready: {info['sentences']} {info['split']} sentences, beam {cfg.eval.beam_size}", flush=True)
        fit_started = time.time()
        nonfinite_path(run_dir).unlink(missing_ok=True)  # from an earlier attempt of this run
        build_trainer(cfg, run_dir, evaluator_name).fit()
        # Scores still pending were awaited by fit(); finalize does the end-of-run work
        # (e.g. the best checkpoint on the test set) and returns every record.
        records = ray.get(evaluator.finalize.remote())
        _report_final(ray.get(evaluator.final.remote()), run_dir)
        # Last, so that the run ends with the dev BLEU line (signature included).
        _summarize([r for r in records if r.split == "dev"], time.time() - fit_started)
        _raise_if_nonfinite(run_dir)
        return records
    finally:
        if evaluator is not None:
            ray.kill(evaluator)  # on a shared cluster it would otherwise outlive the run
        if ray_handle is not None:
            ray_handle.stop()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _name_ray_log(cfg: Config, log_path: Path, prefix: str = "") -> None:
    """Tell the user, at the start of a run, where Ray's informational lines go."""
    print(f"[distnmt] {prefix}Ray's informational lines: {log_path}"
          + ("" if cfg.logging.ray == "info" else " (logging.ray: info shows them here too)"), flush=True)


def run_local(cfg: Config, run_dir: Path) -> list[ScoreRecord]:
    """``train.workers: 0``: train in this process (Ray Train's local mode), then score
    the run's checkpoints here with the evaluator's own class, and close as a cluster run does."""
    started = time.time()
    nonfinite_path(run_dir).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path, undo_logs = route_local_mode_logs(cfg, run_dir)
    _name_ray_log(cfg, log_path, "Ray Train's local mode, in this process; ")
    try:
        build_local_trainer(cfg, run_dir).fit()
    finally:
        undo_logs()
    evaluator = Evaluator(cfg.to_dict(), cfg.data.prepared_dir, str(run_dir))
    for checkpoint in list_checkpoints(run_dir):
        # What Ray's validation hook hands the actor in a cluster run (eval.policy applies).
        evaluator.score_checkpoint(ray.train.Checkpoint.from_directory(str(checkpoint)))
    records = evaluator.finalize()
    _report_final(evaluator.final(), run_dir)
    _summarize([r for r in records if r.split == "dev"], time.time() - started)
    _raise_if_nonfinite(run_dir)
    return records


def _raise_if_nonfinite(run_dir: Path) -> None:
    """Training stopped on a non-finite loss: one line naming the last good checkpoint."""
    path = nonfinite_path(run_dir)
    if path.exists():
        stopped = json.loads(path.read_text(encoding="utf-8"))
        raise TrainingError(f"{stopped['message']}; last good checkpoint: {newest_valid_checkpoint(run_dir) or 'none'}")


def preflight(cfg: Config, run_dir: Path, manifest: dict[str, Any]) -> None:
    """Checks that need no cluster, so that a mistake costs a second and one line, not a
    worker's traceback: the DeepSpeed JSON, GPUs, and the checkpoint a rerun would resume."""
    if cfg.train.backend == "deepspeed":
        deepspeed_config(cfg, cfg.train.max_workers)  # ZeRO stage, keys contradicting the YAML
    wants = [(key, wanted) for key, wanted in (("train.use_gpu", cfg.train.use_gpu), ("eval.num_gpus", cfg.eval.num_gpus))
             if wanted]
    lacking = None
    if wants and ray.is_initialized():
        # Ray already up in this process (a benchmark starts it once for all its runs): ask
        # it, or the run waits for a worker group that can never be placed.
        if not ray.cluster_resources().get("GPU", 0):
            lacking = "the Ray cluster this process runs on has no GPU"
    elif wants and not (cfg.train.ray_address or os.environ.get("RAY_ADDRESS")):
        # A local run; a joined cluster's GPUs are on its nodes, not necessarily here.
        import torch

        if not torch.cuda.is_available():
            lacking = "this machine has no GPU (and no Ray address was given to join a cluster that has)"
    if lacking is not None:
        key, wanted = wants[0]
        raise ConfigError(f"{key}: {wanted!r} but {lacking}")
    newest = newest_valid_checkpoint(run_dir)  # broken ones are skipped with a warning naming them
    if newest is not None:
        meta = read_meta(newest)
        check_vocab(meta, manifest["spm_sha256"], newest)
        check_same_model(meta, cfg.to_dict()["model"], newest)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_on_sigterm() -> Optional[Any]:
    """SIGTERM (a scheduler, `kill`, `ray job stop`) unwinds like Ctrl-C, so the finally
    clause stops the local Ray cluster instead of leaving its processes behind.
    Returns the handler to restore (None when not on the main thread, where Python
    does not allow handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _report_final(final: FinalReport, run_dir: Path) -> None:
    """Why training ended, the best checkpoint on the test set, where the figures are."""
    if final.stop_reason:
        print(f"[distnmt] training stopped early: {final.stop_reason}", flush=True)
    if final.figures:
        print(f"[distnmt] figures: {', '.join(str(run_dir / f) for f in final.figures)}", flush=True)
    if final.test:
        test = final.test
        print(f"[distnmt] {test.test_set} {test.checkpoint} (best by dev BLEU): {test.bleu_line}", flush=True)


def _summarize(records: list[ScoreRecord], seconds: float) -> None:
    """The closing lines: every score, then the newest checkpoint's BLEU line."""
    print(f"[distnmt] training and evaluation took {seconds:.1f} s; {len(records)} checkpoint(s) scored", flush=True)
    if not records:
        return
    for record in sorted(records, key=lambda r: r.step):
        print(f"[distnmt]   step {record.step:>7}: BLEU {record.bleu:.2f}  chrF {record.chrf:.2f}  ({record.checkpoint})")
    best = max(records, key=lambda r: r.bleu)
    last = max(records, key=lambda r: r.step)
    print(f"[distnmt] best: {best.checkpoint} BLEU {best.bleu:.2f}")
    print(f"{last.test_set} {last.checkpoint}: {last.bleu_line}", flush=True)
