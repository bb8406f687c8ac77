#!/usr/bin/env bash
# Submit a distnmt run to a Ray cluster with `ray job submit`: `distnmt cluster submit --help`.
#
#   launch/submit.sh [--address URL] [--prepare] [--env NAME] [--id ID] [--no-wait] CONFIG [--set KEY=VALUE ...]
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"
exec "$PYTHON" -m distnmt.cli cluster submit "$@"
