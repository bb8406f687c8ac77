#!/usr/bin/env bash
# Start a local Ray head node for `ray job submit`, on free ports, token auth,
# dashboard on 127.0.0.1: `distnmt cluster start --help` (distnmt/cluster/commands.py).
#
#   launch/start-head.sh [--num-cpus N] [--num-gpus N] [--dashboard-host HOST] [-- EXTRA RAY START ARGS]
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"
exec "$PYTHON" -m distnmt.cli cluster start "$@"
