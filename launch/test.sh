#!/usr/bin/env bash
# README command 2: set everything up, then run the whole test suite.
#
#   bash launch/test.sh                 # the whole suite: two pytest streams (below)
#   bash launch/test.sh tests/test_x.py # any pytest arguments: one plain pytest run
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. "${DISTNMT_VENV:-.venv}/bin/activate"
# W&B never goes online from tests.
export WANDB_MODE=offline
# --durations: the slowest tests in every log, to keep the suite within its 15 minutes.
PYTEST=(python -m pytest -q -ra --durations=15)
if [ $# -gt 0 ]; then
  exec "${PYTEST[@]}" "$@"
fi

# The whole suite as two streams side by side. The tests that start Ray (marked `ray`:
# local clusters, jobs, Ray Train workers) leave about a quarter of 2 cores idle while
# they wait on Ray (vmstat over a serial run: 65 % busy, 27 % idle); everything else
# (unit tests, and the integration tests without Ray: torch.multiprocessing ZeRO
# groups, Ray Train's local mode, JoeyNMT) fills it. Ray clusters never run two at a
# time, so the timing-sensitive ones (preemption deadlines, signals) keep their margins.
# The Ray stream prints here as it goes; the other one's output follows it. Each
# stream is one pytest session with its own temp dir.
other_log=$(mktemp -t distnmt-tests.XXXXXX.log)
"${PYTEST[@]}" -m "not ray" >"$other_log" 2>&1 &
other_pid=$!
# Ctrl-C or a failed Ray stream does not leave the other stream running.
trap 'kill "$other_pid" 2>/dev/null || true' EXIT
echo "[test] the tests without Ray run beside the Ray tests (pid $other_pid, log $other_log)"
ray_rc=0
"${PYTEST[@]}" -m ray || ray_rc=$?
other_rc=0
wait "$other_pid" || other_rc=$?
trap - EXIT
echo
echo "[test] ---------------- tests without Ray (run beside the above) ----------------"
cat "$other_log"
rm -f "$other_log"
echo "[test] tests with Ray: exit $ray_rc; tests without Ray: exit $other_rc"
[ "$ray_rc" -eq 0 ] && [ "$other_rc" -eq 0 ]
