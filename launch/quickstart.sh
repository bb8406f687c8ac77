#!/usr/bin/env bash
# README command 1: set everything up, then a short real training run on the
# local default (local Ray, 2 CPU workers, the WMT'14 sample, evaluator actor),
# ending with the evaluator's sacreBLEU line on newstest2013.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash launch/setup.sh
t1=$(date +%s)
. "${DISTNMT_VENV:-.venv}/bin/activate"
CONFIG=${CONFIG:-configs/quickstart.yaml}
distnmt prepare --config "$CONFIG" "$@"
t2=$(date +%s)
distnmt train --config "$CONFIG" "$@"
t3=$(date +%s)
echo "[quickstart] wall time: setup $((t1 - t0)) s, prepare $((t2 - t1)) s, train+evaluate $((t3 - t2)) s, total $((t3 - t0)) s"
