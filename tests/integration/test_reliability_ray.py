"""Faults a cluster run meets, with real Ray, real worker processes and real signals
(issue 9): the driver stopped (SIGTERM, then SIGKILL) and run again, the rerun
surviving a DeepSpeed worker SIGKILLed mid-step. The DDP worker kill and the
evaluator kill are one run of test_evaluator_ray.py; a loss that stays
NaN (DDP and DeepSpeed, and the driver's one-line error) needs no cluster and is in
tests/test_trainer.py."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml

from distnmt.checkpoint import checkpoint_step, load_checkpoint, newest_valid_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())


# ------------------------------------------------------------------ the driver


def _session_pids(sid: int) -> list[int]:
    """Processes of the session the test started the driver in (Ray's included)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def _kill_session(sid: int) -> list[int]:
    """SIGKILL what is left of the test's own session, by pid; returns those pids."""
    left = _session_pids(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _wait_for(predicate, timeout: float, what: str, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def _newest_step(run_dir: Path) -> int:
    newest = newest_valid_checkpoint(run_dir) if run_dir.exists() else None
    return checkpoint_step(newest) if newest is not None else -1


def test_driver_stopped_by_sigterm_then_sigkill_and_rerun_resumes_through_a_deepspeed_worker_kill(
    tiny_config, tmp_path: Path
) -> None:
    """`distnmt train` (DeepSpeed ZeRO-2, bf16) in its own session: SIGTERM once a
    checkpoint exists (it stops its local Ray cluster and exits), the same command again,
    SIGKILL once that wrote a newer checkpoint (nothing can clean up: the test kills what
    is left of the session by pid), the same command a third time: it resumes from the
    newest checkpoint in the same run directory and W&B run; there rank 1 is SIGKILLed
    mid-step, Ray replaces it, it resumes from the last checkpoint and the run finishes.
    A W&B key in the environment reaches no file of the run and no log."""
    storage, name = tmp_path / "runs", "driver"
    run_dir = storage / name
    cfg = tiny_config(storage, name, "train.max_steps=60", "train.checkpoint_every=10", "eval.max_sentences=5",
                      "train.backend=deepspeed", f"train.deepspeed_config={REPO}/configs/deepspeed/zero2.json",
                      "train.precision=bf16", "train.max_failures=1", "logging.wandb=offline",
                      "eval.test_at_end=false", "eval.figures=false")
    config_file = tmp_path / "driver.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    key = "wk-" + secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_API_KEY": key, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    command = [sys.executable, "-m", "distnmt.cli", "train", "--config", str(config_file)]
    logs: list[Path] = []

    def start(extra_env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        logs.append(tmp_path / f"driver{len(logs) + 1}.log")
        with open(logs[-1], "w") as log:
            return subprocess.Popen(command, cwd=tmp_path, env={**env, **(extra_env or {})}, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    # 1. SIGTERM after the first checkpoint; the driver unwinds and stops its cluster.
    first = start()
    try:
        _wait_for(lambda: _newest_step(run_dir) >= 10, 300, "a first checkpoint", first)
        os.kill(first.pid, signal.SIGTERM)
        try:
            first.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.kill(first.pid, signal.SIGKILL)  # what a scheduler does after its grace period
            first.wait(timeout=30)
        assert first.returncode == 130, logs[0].read_text()[-3000:]
        assert "interrupted; run the same command again to resume" in logs[0].read_text()
        # Ray's processes went with it (the driver's `ray.shutdown()` on the way out).
        _wait_for(lambda: _session_pids(first.pid) == [], 60, "the first driver's Ray processes to exit")
    finally:
        _kill_session(first.pid)
    stopped_at = _newest_step(run_dir)

    # 2. The same command; SIGKILL once it has written a newer checkpoint.
    second = start()
    try:
        _wait_for(lambda: _newest_step(run_dir) > stopped_at, 300, "a checkpoint after the restart", second)
        os.kill(second.pid, signal.SIGKILL)
        second.wait(timeout=30)
    finally:
        time.sleep(2)
        left = _kill_session(second.pid)
    print(f"after SIGKILL of the driver, {len(left)} process(es) of its session were left and killed by pid")
    assert f"resumed from checkpoint_{stopped_at:08d}" in logs[1].read_text(), logs[1].read_text()[-3000:]
    k = _newest_step(run_dir)
    assert k <= 40, f"the driver was not stopped in time (newest checkpoint {k})"

    # 3. The same command once more: resumes from checkpoint k; rank 1 is SIGKILLed as it
    # starts step k+3, Ray replaces it, training resumes from checkpoint k and finishes.
    marker = tmp_path / "worker-killed"
    third = start({"DISTNMT_FAULT_KILL": f"1:{k + 3}:{marker}"})
    try:
        third.wait(timeout=400)
    finally:
        _kill_session(third.pid)
    third_log = logs[2].read_text()
    assert third.returncode == 0, third_log[-3000:]
    assert marker.exists(), "the worker fault was not injected"
    assert third_log.count(f"resumed from checkpoint_{k:08d}") == 2, third_log[-3000:]  # driver rerun, worker restart
    assert "newstest2013 checkpoint_00000060: BLEU|" in third_log  # scored by the evaluator
    assert _checkpoints(run_dir)[-1] == "checkpoint_00000060"
    last = load_checkpoint(run_dir / "checkpoint_00000060")  # checksums, both ranks' manifests included
    assert sorted(last.meta["required"]) == ["ranks/rank0.json", "ranks/rank1.json"]
    assert len(list((run_dir / "checkpoint_00000060/deepspeed/state").glob("*optim_states.pt"))) == 2

    # One W&B run id across the three drivers (offline run folders: one per attempt, and
    # one more for the replaced worker group).
    wandb_runs = sorted(p for p in (run_dir / "wandb").glob("offline-run-*") if "-eval-" not in p.name)
    # offline-run-<date>_<time>-<id>, with "-1" appended by wandb when two start in the same second
    ids = {re.match(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)", p.name).group(1) for p in wandb_runs}
    assert len(wandb_runs) == 4 and len(ids) == 1, wandb_runs
    assert ids == {last.meta["wandb_run_id"]}
    # The key was in every process's environment; no file of the run and no log holds it.
    leaks = subprocess.run(["grep", "-rl", key, str(run_dir), *map(str, logs)], capture_output=True, text=True)
    assert leaks.stdout == "", f"WANDB_API_KEY written to: {leaks.stdout}"
