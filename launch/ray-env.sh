#!/usr/bin/env bash
# Print the exports that point the plain ray CLI, and `distnmt train`, at the local
# head:   eval "$(launch/ray-env.sh)"   (= `distnmt cluster env`)
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"
exec "$PYTHON" -m distnmt.cli cluster env "$@"
