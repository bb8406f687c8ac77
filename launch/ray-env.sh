#!/usr/bin/env bash
# Print the exports that point the plain ray CLI, and `distnmt train`, at the local
# head that launch/start-head.sh started:   eval "$(launch/ray-env.sh)"
# Then `ray status`, `ray job list` or `distnmt train --config ...` use that cluster
# (RAY_ADDRESS makes distnmt join it instead of starting its own).
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"
use_local_cluster
for name in RAY_ADDRESS RAY_API_SERVER_ADDRESS RAY_AUTH_MODE RAY_AUTH_TOKEN_PATH; do
  printf 'export %s=%q\n' "$name" "${!name}"
done
