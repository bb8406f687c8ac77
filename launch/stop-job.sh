#!/usr/bin/env bash
# Stop a running job; the cluster keeps running: `distnmt cluster stop-job --help`.
#
#   launch/stop-job.sh [--address URL] [JOB_ID]
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"
exec "$PYTHON" -m distnmt.cli cluster stop-job "$@"
