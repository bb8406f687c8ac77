"""A quickstart-sized `distnmt train` on the local cluster it starts itself, end to end
with real parts: 2 Ray Train workers (gloo DDP) train on the real WMT'14 sample while
the evaluator actor scores every checkpoint with sacreBLEU, and `distnmt translate`
uses the last checkpoint alone. The same run, seen as a user sees it (issue 18): what
reaches the console (distnmt's lines, not Ray's informational ones, which go to the
run's log file), which sockets the run's Ray processes listen on (loopback only), that
every Ray process of the run knows its own cluster's address and the run's Ray Train
settings, and what the process tree costs in memory (PSS). One run for all of it: each
Ray run costs the suite tens of seconds of start-up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distnmt.checkpoint import load_checkpoint
from distnmt.cluster import is_loopback, listening_sockets, process_tree, tree_memory

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.ray]

# Ray Train's per-checkpoint chatter and Ray's start-up notice (issue 18's list).
RAY_INFO = ("Checkpoint successfully created", "Reporting training result", "Launched async validation task",
            "Running validations for checkpoint", "Staged validations for checkpoint", "Started a local Ray instance")


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


NODE_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
START_TIMEOUT_S = 45  # not Ray's default (60): seen in the workers' environment only if passed on


def test_local_run_console_loopback_and_address(tiny_overrides: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"}}
    env["WANDB_MODE"] = "offline"
    args = [sys.executable, "-m", "distnmt.cli", "train", "--config", "configs/quickstart.yaml"]
    for item in [*tiny_overrides, "train.max_steps=150", "train.checkpoint_every=50", "eval.test_at_end=false",
                 "eval.figures=false", f"train.worker_start_timeout_s={START_TIMEOUT_S}",
                 f"train.storage_path={tmp_path}", "train.name=local"]:
        args += ["--set", item]
    out_path = tmp_path / "console.txt"
    sockets: set[tuple[int, str, int]] = set()
    names: dict[int, str] = {}
    addresses: dict[int, str] = {}
    start_timeouts: dict[int, str] = {}
    peak_pss, polls = 0.0, 0
    with open(out_path, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                tree = process_tree(proc.pid)
                for pid, address, port in listening_sockets(tree):
                    sockets.add((pid, address, port))
                    # The latest command line: a Ray worker starts as ray::IDLE and is
                    # renamed when it becomes an actor (a training worker, the evaluator).
                    names[pid] = _cmdline(pid)[:80] or names.get(pid, "")
                for pid in tree:
                    command = _cmdline(pid)
                    # A Ray worker: an actor or a task of the run. Not the node's own agents
                    # (dashboard, runtime env), which the raylet starts before any job exists.
                    if command.startswith("ray::") and not command.startswith(NODE_AGENTS):
                        environ = _environ(pid)
                        addresses[pid] = environ.get("RAY_ADDRESS", "")
                        start_timeouts[pid] = environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "")
                        names.setdefault(pid, command[:80])
                # Reading every process's smaps costs the kernel real time: every 4th look.
                if polls % 4 == 0:
                    peak_pss = max(peak_pss, tree_memory(tree)["pss"])
                polls += 1
                time.sleep(1.0)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    console = out_path.read_text(errors="replace")
    assert proc.returncode == 0, console[-4000:]
    print(f"console: {len(console.splitlines())} lines; tree peak PSS {peak_pss:.0f} MiB")

    # distnmt's own lines are there ...
    assert "[distnmt] Ray ready" in console
    assert re.search(r"\[train\] step 10/150 .* tgt tok/s", console), console[-3000:]
    assert "[evaluator] newstest2013 checkpoint_00000050" in console
    assert "newstest2013 checkpoint_00000150: BLEU|nrefs:1|" in console.splitlines()[-1]
    # ... Ray's informational ones are not: they are in the log file named at the start.
    for text in RAY_INFO:
        assert text not in console, text
    named = re.search(r"\[distnmt\] Ray's informational lines: (\S+)", console)
    assert named, console[:2000]
    ray_log = Path(named.group(1))
    assert ray_log.parent == tmp_path / "local" / "logs"
    logged = ray_log.read_text(errors="replace")
    assert "Checkpoint successfully created" in logged and "Reporting training result" in logged

    # Loopback only: the GCS, raylet, object manager, dashboard and its agent, workers.
    assert len({port for _, _, port in sockets}) >= 3, sockets  # the run's Ray processes were seen
    outside = sorted((pid, names.get(pid, "").strip(), address, port) for pid, address, port in sockets
                     if not is_loopback(address))
    # None at all: rank 0's torch.distributed rendezvous (TCPStore, which would listen on
    # "::" by itself) serves on a socket distnmt binds to the node's address
    # (distnmt/cluster/process_group.py), and gloo's own sockets follow that address.
    assert outside == [], outside
    training = {pid for pid, name in names.items() if name.startswith("ray::RayTrainWorker")}
    assert any(pid in training for pid, _, _ in sockets), "no training worker's listening socket was seen"

    # Every Ray worker process of the run was told its own cluster's address.
    assert addresses, "no Ray worker process seen"
    assert len(set(addresses.values())) == 1 and next(iter(addresses.values())).startswith("127.0.0.1:"), \
        {pid: (names.get(pid), address) for pid, address in addresses.items()}
    # ... and the run's Ray Train settings (the controller reads this one; the driver is not it).
    assert set(start_timeouts.values()) == {str(START_TIMEOUT_S)}, start_timeouts

    _check_checkpoints_scores_and_translate(tmp_path / "local")


def _check_checkpoints_scores_and_translate(run_dir: Path) -> None:
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert [p.name for p in checkpoints] == ["checkpoint_00000050", "checkpoint_00000100", "checkpoint_00000150"]
    # Every checkpoint was scored by the evaluator, and the scores are persisted.
    persisted = [json.loads(line) for line in (run_dir / "eval" / "dev.jsonl").read_text().splitlines()]
    assert sorted(r["checkpoint"] for r in persisted) == [p.name for p in checkpoints]
    for record in persisted:
        assert record["sentences"] == 30  # TINY's eval.max_sentences
        assert 0.0 <= record["bleu"] <= 100.0
        assert record["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
        hyp = (run_dir / "eval" / f"dev.{record['checkpoint']}.hyp").read_text().splitlines()
        assert len(hyp) == 30
    # Concurrency: the first checkpoint was scored before training wrote its last one.
    first = min(persisted, key=lambda r: r["step"])
    assert first["scored_at"] < (checkpoints[-1] / "meta.json").stat().st_mtime

    # The checkpoint is complete: loads with checksums, holds the resume state.
    last = load_checkpoint(checkpoints[-1])
    assert last.step == 150
    assert {"model", "optimizer", "scheduler", "scaler", "sampler", "step", "epoch"} <= set(last.state)
    # Every rank's RNG state, merged by Ray from the workers' checkpoint directories.
    assert sorted(p.name for p in (checkpoints[-1] / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]

    # `distnmt translate` from that checkpoint alone: one output line per input line.
    lines = ["The house is small.", "", "Thank you very much for your attention."]
    out = subprocess.run(
        [sys.executable, "-m", "distnmt.cli", "translate", str(checkpoints[-1]), "--beam", "3", "--quiet"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == len(lines)
