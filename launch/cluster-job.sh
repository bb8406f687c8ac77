#!/usr/bin/env bash
# The entrypoint of a training job on a cluster whose nodes share storage at
# $DISTNMT_SHARED (default /mnt/shared): prepare the data once, then train.
# configs/cluster/kuberay-rayjob.yaml runs it; with `ray job submit`:
#   ray job submit --working-dir . -- bash launch/cluster-job.sh configs/rnnsearch-50.yaml
#
#   launch/cluster-job.sh CONFIG [--set KEY=VALUE ...]
#
# Layout on the shared storage (the same for every job, so data are prepared once):
#   $DISTNMT_SHARED/data/wmt14-en-fr      raw WMT'14 files (copied there beforehand)
#   $DISTNMT_SHARED/prepared/<config>/    `distnmt prepare` output, written once
#   $DISTNMT_SHARED/runs/<train.name>/    checkpoints and evaluator scores
# Two jobs starting together do not both prepare: the first holds a lock
# (flock on the shared file system) and the second then finds its manifest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: launch/cluster-job.sh CONFIG [--set KEY=VALUE ...]" >&2; exit 2; }
config=$1; shift
shared=${DISTNMT_SHARED:-/mnt/shared}
prepared="$shared/prepared/$(basename "$config" .yaml)"
paths=(--set "data.source_dir=$shared/data/wmt14-en-fr" --set "data.prepared_dir=$prepared"
       --set "train.storage_path=$shared/runs")
mkdir -p "$shared/prepared" "$shared/runs"
(
  flock 9
  # manifest.json is written last by prepare: present means complete.
  if [ ! -f "$prepared/manifest.json" ]; then
    python -m distnmt.cli prepare --config "$config" "${paths[@]}" "$@"
  fi
) 9> "$prepared.lock"
exec python -m distnmt.cli train --config "$config" "${paths[@]}" "$@"
