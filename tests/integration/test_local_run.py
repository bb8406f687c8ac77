"""A quickstart-sized `distnmt train` on the local cluster it starts itself, seen as a
user sees it (issue 18): what reaches the console (distnmt's lines, not Ray's
informational ones, which go to the run's log file), which sockets the run's Ray
processes listen on (loopback only), that every Ray process of the run knows its own
cluster's address, and what the process tree costs in memory (PSS)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distnmt.cluster import is_loopback, listening_sockets, process_tree, tree_memory

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

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


def test_local_run_console_loopback_and_address(tiny_overrides: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"}}
    env["WANDB_MODE"] = "offline"
    args = [sys.executable, "-m", "distnmt.cli", "train", "--config", "configs/quickstart.yaml"]
    for item in [*tiny_overrides, "train.max_steps=20", "train.checkpoint_every=10", "eval.test_at_end=false",
                 "eval.figures=false", "eval.max_sentences=10", f"train.storage_path={tmp_path}", "train.name=local"]:
        args += ["--set", item]
    out_path = tmp_path / "console.txt"
    sockets: set[tuple[int, str, int]] = set()
    names: dict[int, str] = {}
    addresses: dict[int, str] = {}
    peak_pss = 0.0
    with open(out_path, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                tree = process_tree(proc.pid)
                for pid, address, port in listening_sockets(tree):
                    sockets.add((pid, address, port))
                    names.setdefault(pid, _cmdline(pid)[:80])
                for pid in tree:
                    command = _cmdline(pid)
                    # A Ray worker: an actor or a task of the run. Not the node's own agents
                    # (dashboard, runtime env), which the raylet starts before any job exists.
                    if command.startswith("ray::") and not command.startswith(NODE_AGENTS):
                        addresses[pid] = _environ(pid).get("RAY_ADDRESS", "")
                        names.setdefault(pid, command[:80])
                peak_pss = max(peak_pss, tree_memory(tree)["pss"])
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    console = out_path.read_text(errors="replace")
    assert proc.returncode == 0, console[-4000:]
    print(f"console: {len(console.splitlines())} lines; tree peak PSS {peak_pss:.0f} MiB")

    # distnmt's own lines are there ...
    assert "[distnmt] Ray ready" in console
    assert re.search(r"\[train\] step 10/20 .* tgt tok/s", console), console[-3000:]
    assert "[evaluator] newstest2013 checkpoint_00000010" in console
    assert "newstest2013 checkpoint_00000020: BLEU|nrefs:1|" in console.splitlines()[-1]
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
    # Known exception (docs/RELIABILITY.md, known limits): one idle pool worker
    # (ray::IDLE) was seen listening on "::" once; every daemon and every actor of the run
    # (GCS, raylet, dashboard, agents, controller, workers, evaluator) is on loopback.
    assert [o for o in outside if o[1] != "ray::IDLE"] == [], outside

    # Every Ray worker process of the run was told its own cluster's address.
    assert addresses, "no Ray worker process seen"
    assert len(set(addresses.values())) == 1 and next(iter(addresses.values())).startswith("127.0.0.1:"), \
        {pid: (names.get(pid), address) for pid, address in addresses.items()}
