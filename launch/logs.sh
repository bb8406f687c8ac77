#!/usr/bin/env bash
# Follow a job's logs until it ends; exit 0 only if it SUCCEEDED.
#
#   launch/logs.sh [--address URL] [JOB_ID]
# JOB_ID defaults to the last job launch/submit.sh sent to the local head.
# Ctrl-C stops following, not the job (that is launch/stop-job.sh).
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"
address=""
if [ "${1:-}" = --address ]; then address=$2; shift 2; fi
select_cluster "$address"
job=${1:-$(cat "$STATE/last-job" 2>/dev/null || true)}
[ -n "$job" ] || die "usage: launch/logs.sh [--address URL] JOB_ID (no last job recorded in $STATE)"
ray job logs --follow "$job"
# `ray job logs` exits 0 whatever the job's fate; ask the job server.
status=$("$PYTHON" "$LAUNCH_DIR/localray.py" job-status "$job")
say "job $job: ${status:-unknown status}"
[ "$status" = SUCCEEDED ]
