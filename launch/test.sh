#!/usr/bin/env bash
# README command 2: set everything up, then run the whole test suite.
#
# The suite runs as three pytest processes side by side: the unit tests (mostly CPU)
# and tests/integration split into two streams (real Ray clusters, which spend most of
# their time waiting on start-up, polling and each other: a serial run kept 2 cores
# about a quarter busy). The integration output is printed after the unit tests'; the
# exit status is the worst of the three.
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
# tests/integration in two streams of about equal length (measured): the files below
# in the second, every other one (a new file too) in the first; the two longest
# (elastic, reliability_ray) are in different streams.
second=" test_reliability_ray.py test_job_submit.py test_evaluator_ray.py test_local_run.py test_ray_run.py "
streams=("" "")
for file in tests/integration/test_*.py; do
  if [[ "$second" == *" ${file##*/} "* ]]; then streams[1]+="$file "; else streams[0]+="$file "; fi
done
pids=()
for s in 0 1; do
  # --basetemp: each run its own tmp_path root, so none prunes another's.
  # shellcheck disable=SC2086  # the file list is meant to split into words
  python -m pytest -q -ra --durations=8 -p no:cacheprovider --basetemp="$scratch/integration$s" \
    ${streams[s]} >"$scratch/integration$s.log" 2>&1 &
  pids+=("$!")
done
# Ctrl-C or a CI timeout stops the background runs too (their fixtures stop their clusters).
trap 'kill -INT "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$scratch"' EXIT

worst=0
python -m pytest -q -ra --durations=10 --basetemp="$scratch/unit" --ignore=tests/integration || worst=$?
for s in 0 1; do
  code=0
  wait "${pids[s]}" || code=$?
  echo
  echo "==================== integration stream $((s + 1)) of 2 (ran beside the unit tests): ${streams[s]}"
  cat "$scratch/integration$s.log"
  echo "[test] integration stream $((s + 1)): exit $code"
  worst=$(( code > worst ? code : worst ))
done
echo "[test] unit and integration tests: exit $worst"
exit "$worst"
