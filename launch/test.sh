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

# The whole suite as two streams side by side. The integration tests (real Ray
# clusters, DeepSpeed, signals) leave about a quarter of 2 cores idle while they wait
# on Ray (vmstat over a serial run: 65 % busy, 27 % idle), and the unit tests (about
# 2 minutes of CPU) fill it. The integration stream prints here as it goes; the unit
# stream's output follows it. Each stream is one pytest session with its own temp dir.
unit_log=$(mktemp -t distnmt-unit-tests.XXXXXX.log)
"${PYTEST[@]}" -m "not integration" >"$unit_log" 2>&1 &
unit_pid=$!
# Ctrl-C or a failed integration stream does not leave the unit stream running.
trap 'kill "$unit_pid" 2>/dev/null || true' EXIT
echo "[test] unit tests run beside the integration tests (pid $unit_pid, log $unit_log)"
integration_rc=0
"${PYTEST[@]}" -m integration || integration_rc=$?
unit_rc=0
wait "$unit_pid" || unit_rc=$?
trap - EXIT
echo
echo "[test] ---------------- unit tests (run beside the above) ----------------"
cat "$unit_log"
rm -f "$unit_log"
echo "[test] integration tests: exit $integration_rc; unit tests: exit $unit_rc"
[ "$integration_rc" -eq 0 ] && [ "$unit_rc" -eq 0 ]
