#!/usr/bin/env bash
# Follow a job's logs until it ends; exit 0 only if it SUCCEEDED: `distnmt cluster logs --help`.
#
#   launch/logs.sh [--address URL] [JOB_ID]
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"
exec "$PYTHON" -m distnmt.cli cluster logs "$@"
