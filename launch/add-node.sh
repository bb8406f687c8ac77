#!/usr/bin/env bash
# Join one more Ray node, on this same machine, to the local head: a two-node
# cluster on one machine. `distnmt cluster add-node --help`.
#
#   launch/add-node.sh [--num-cpus N] [--num-gpus N] [-- EXTRA RAY START ARGS]
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"
exec "$PYTHON" -m distnmt.cli cluster add-node "$@"
