"""Where a command's CPU time goes, by kind of process: what the suite's time is made of.

    python tests/cpu_profile.py -- python -m pytest -q -m ray
    python tests/cpu_profile.py -- distnmt train --config configs/quickstart.yaml

Runs the command and, every 0.3 s, reads /proc/<pid>/stat (user + system time) of
every process that started after it, whatever its parent: Ray's daemons and workers
are not children of the command. A Ray worker is counted under its latest name
(``ray::RayTrainWorker``, ``ray::IDLE``...), any other process under its command line.
A process's last 0.3 s before it exits are not seen, so the totals are a little low.
Prints the wall time, the CPU seconds in all and the 25 biggest kinds; exits with
the command's status. Linux only (reads /proc). Not a test: pytest does not collect it.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")
# Command-line fragments that name a kind of process (Ray's daemons, the test runner, the CLI).
KINDS = ("gcs_server", "raylet", "dashboard/agent", "dashboard.py", "runtime_env/agent", "log_monitor",
         "monitor.py", "pytest", "distnmt", "wandb", "joeynmt")


def snapshot() -> dict[tuple[int, int], tuple[float, str]]:
    """(pid, start tick) -> (CPU seconds so far, command line) for every process now."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # it ended meanwhile
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "(comm)", which may hold spaces
        cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
        found[(int(name), int(fields[19]))] = (cpu, command)  # the start time tells reused pids apart
    return found


def kind(command: str) -> str:
    command = " ".join(command.split())  # a `python -c` script's newlines, on one line
    if command.startswith("ray::"):
        return command.split()[0]
    return next((k for k in KINDS if k in command), command[:60])


def main(argv: list[str]) -> int:
    command = argv[1:] if argv[:1] == ["--"] else argv
    if not command:
        print(__doc__)
        return 2
    before = set(snapshot())
    started = time.time()
    proc = subprocess.Popen(command)
    seen: dict[tuple[int, int], tuple[float, str]] = {}
    while proc.poll() is None:
        for key, (cpu, cmd) in snapshot().items():
            if key not in before:
                # A zombie's command line is empty: keep the name it had.
                seen[key] = (cpu, cmd or seen.get(key, (0.0, ""))[1])
        time.sleep(0.3)
    wall = time.time() - started
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for cpu, cmd in seen.values():
        totals[kind(cmd)][0] += cpu
        totals[kind(cmd)][1] += 1
    print(f"[cpu] wall {wall:.1f} s, CPU {sum(t[0] for t in totals.values()):.1f} s in {len(seen)} processes")
    for name, (cpu, count) in sorted(totals.items(), key=lambda item: -item[1][0])[:25]:
        print(f"[cpu] {cpu:8.1f} s {int(count):4d}  {name}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
