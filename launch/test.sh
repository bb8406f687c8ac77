#!/usr/bin/env bash
# README command 2: set everything up, then run the whole test suite.
#
# The suite runs as two pytest processes side by side: the unit tests (one process,
# mostly CPU) and tests/integration (real Ray clusters, one at a time, which spend much
# of their time waiting on start-up and polling). On 2 cores that takes about the
# time of the longer of the two instead of their sum. The integration tests' output is
# printed after the unit tests'; the exit status is the worse of the two.
# With arguments (e.g. a test file or -k), one plain pytest run of just those.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. "${DISTNMT_VENV:-.venv}/bin/activate"
# W&B never goes online from tests.
export WANDB_MODE=offline
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q -ra --durations=15 "$@"
fi

scratch=$(mktemp -d -t distnmt-tests.XXXXXX)
# --basetemp: each run its own tmp_path root, so neither prunes the other's.
python -m pytest -q -ra --durations=10 -p no:cacheprovider --basetemp="$scratch/integration" \
  tests/integration >"$scratch/integration.log" 2>&1 &
integration_pid=$!
# Ctrl-C or a CI timeout stops the background run too (its fixtures stop their clusters).
trap 'kill -INT "$integration_pid" 2>/dev/null || true; wait "$integration_pid" 2>/dev/null || true; rm -rf "$scratch"' EXIT

unit=0
python -m pytest -q -ra --durations=10 --basetemp="$scratch/unit" --ignore=tests/integration || unit=$?
integration=0
wait "$integration_pid" || integration=$?
echo
echo "==================== tests/integration (ran beside the unit tests) ===================="
cat "$scratch/integration.log"
echo "[test] unit tests: exit $unit; integration tests: exit $integration"
exit $(( unit > integration ? unit : integration ))
