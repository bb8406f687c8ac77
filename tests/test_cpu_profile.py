"""tests/cpu_profile.py counts the CPU of processes the command started, detached ones included."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("cpu_profile.py")


def test_counts_a_detached_grandchild_under_its_command_line() -> None:
    # The child starts a grandchild in its own session (as Ray starts its daemons) and
    # exits at once; the grandchild burns about a second of CPU.
    burn = "# burner-mark\nimport time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\n"
    child = (f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {burn!r}], "
             "start_new_session=True)")
    out = subprocess.run([sys.executable, str(SCRIPT), "--", sys.executable, "-c", child + "; import time; time.sleep(2)"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    total = re.search(r"\[cpu\] wall [\d.]+ s, CPU ([\d.]+) s in (\d+) processes", out.stdout)
    assert total and float(total.group(1)) >= 0.6 and int(total.group(2)) >= 2, out.stdout
    burner = [line for line in out.stdout.splitlines() if "burner-mark" in line]
    assert burner and float(burner[0].split()[1]) >= 0.6, out.stdout


def test_returns_the_command_status() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--", sys.executable, "-c", "raise SystemExit(7)"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 7
