#!/usr/bin/env bash
# README command 2: set everything up, then run the whole test suite.
#
#   bash launch/test.sh                 # the whole suite: two pytest streams (below)
#   bash launch/test.sh tests/test_x.py # any pytest arguments: one plain pytest run
set -euo pipefail
cd "$(dirname "$0")/.."
# A new venv without pip's bytecode: pip compiles every module of the dependencies
# (27 s of a 60 s install on 2 cores), the suite imports a few thousand of them, and
# compiles each once, on first import. So the tests must be let write the bytecode
# (PYTHONDONTWRITEBYTECODE, set on some machines, would make every process compile its
# imports again: 8.7 s for a worker's instead of 4.3).
DISTNMT_PIP_COMPILE=0 bash launch/setup.sh
unset PYTHONDONTWRITEBYTECODE
. "${DISTNMT_VENV:-.venv}/bin/activate"
# W&B never goes online from tests.
export WANDB_MODE=offline
# --durations: the slowest tests in every log, to keep the suite within its 15 minutes.
PYTEST=(python -m pytest -q -ra --durations=15)
if [ $# -gt 0 ]; then
  exec "${PYTEST[@]}" "$@"
fi

# The whole suite as two streams side by side, so that both cores stay busy: a serial
# run of the tests that start Ray (marked `ray`: local clusters, jobs, Ray Train
# workers) leaves about a third of 2 cores idle while they wait on Ray (vmstat: 65 %
# busy). The first stream is the Ray tests that keep a deadline or a latency
# (preemption notice, signals to a driver, the evaluator killed mid-decode, early
# stopping); the second is everything else: the unit tests, the integration tests
# without Ray, and the Ray tests marked `beside`, which assert no timing and so may
# share the cores with a Ray test of the first stream. The first stream prints here as
# it goes; the second one's output follows it. Each stream is one pytest session with
# its own temp dir.
other_log=$(mktemp -t distnmt-tests.XXXXXX.log)
"${PYTEST[@]}" -m "not ray or beside" >"$other_log" 2>&1 &
other_pid=$!
# Ctrl-C or a failed Ray stream does not leave the other stream running.
trap 'kill "$other_pid" 2>/dev/null || true' EXIT
echo "[test] the second stream (no Ray, or Ray marked beside) runs beside this one (pid $other_pid, log $other_log)"
ray_rc=0
"${PYTEST[@]}" -m "ray and not beside" || ray_rc=$?
other_rc=0
wait "$other_pid" || other_rc=$?
trap - EXIT
echo
echo "[test] ---------------- second stream: no Ray, or Ray marked beside (ran beside the above) ----------------"
cat "$other_log"
rm -f "$other_log"
echo "[test] first stream (Ray, timed): exit $ray_rc; second stream: exit $other_rc"
[ "$ray_rc" -eq 0 ] && [ "$other_rc" -eq 0 ]
