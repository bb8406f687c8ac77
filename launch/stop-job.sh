#!/usr/bin/env bash
# Stop a running job (its driver, Train workers and evaluator) and wait until it has.
# The cluster keeps running; checkpoints written so far stay in the run directory,
# and submitting the same config again resumes from the newest one.
#
#   launch/stop-job.sh [--address URL] [JOB_ID]
# JOB_ID defaults to the last job launch/submit.sh sent to the local head.
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"
address=""
if [ "${1:-}" = --address ]; then address=$2; shift 2; fi
select_cluster "$address"
job=${1:-$(cat "$STATE/last-job" 2>/dev/null || true)}
[ -n "$job" ] || die "usage: launch/stop-job.sh [--address URL] JOB_ID (no last job recorded in $STATE)"
ray job stop "$job"
