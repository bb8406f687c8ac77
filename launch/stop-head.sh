#!/usr/bin/env bash
# Stop the local Ray head (and the nodes add-node.sh joined), by process id;
# never `ray stop`, which stops every Ray cluster of the machine. `distnmt cluster stop --help`.
#
#   launch/stop-head.sh [--keep-logs]
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"
exec "$PYTHON" -m distnmt.cli cluster stop "$@"
