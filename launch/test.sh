#!/usr/bin/env bash
# README command 2: set everything up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. "${DISTNMT_VENV:-.venv}/bin/activate"
# W&B never goes online from tests.
export WANDB_MODE=offline
# --durations: the slowest tests in every log, to keep the suite within its 15 minutes.
exec python -m pytest -q -ra --durations=15 "$@"
