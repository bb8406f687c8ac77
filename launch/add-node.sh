#!/usr/bin/env bash
# Join one more Ray node, on this same machine, to the head of launch/start-head.sh:
# a two-node cluster on one machine, to try multi-node training (workers placed
# on both nodes, checkpoints gathered in one storage path) without a second machine.
#
#   launch/add-node.sh [--num-cpus N] [--num-gpus N] [-- EXTRA RAY START ARGS]
#
# The node gets its own temp dir under the state directory, free ports for the
# ones Ray fixes by default, and the cluster's marker, so launch/stop-head.sh stops it too.
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"

resources=() extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --num-cpus) resources+=(--num-cpus "$2"); shift 2 ;;
    --num-gpus) resources+=(--num-gpus "$2"); shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
local_cluster_running || die "no local Ray head running for $STATE; start one with launch/start-head.sh"
use_local_cluster

# Numbered temp dirs: node-1, node-2, ... (short: Ray's socket paths must fit 107 bytes).
n=1
while [ -e "$STATE/node-$n" ]; do n=$((n + 1)); done
mkdir -p "$STATE/node-$n"
for _ in 1 2 3; do
  read -r agent_port < <("$PYTHON" "$LAUNCH_DIR/localray.py" free-ports 1)
  if env DISTNMT_RAY_CLUSTER="$DISTNMT_RAY_CLUSTER" RAY_LOGGER_LEVEL=warning \
       ray start --address "$GCS_ADDRESS" --disable-usage-stats \
         --dashboard-agent-listen-port "$agent_port" --temp-dir "$STATE/node-$n" \
         "${resources[@]}" "${extra[@]}" > "$STATE/node-$n/ray-start.log" 2>&1; then
    say "node $n joined $GCS_ADDRESS (temp dir $STATE/node-$n)"
    exit 0
  fi
  tail -5 "$STATE/node-$n/ray-start.log" >&2
  "$PYTHON" "$LAUNCH_DIR/localray.py" stop --temp-dir "$STATE/node-$n/" >&2
done
die "ray start --address $GCS_ADDRESS failed 3 times; log: $STATE/node-$n/ray-start.log"
