#!/usr/bin/env bash
# Stop the local Ray cluster that launch/start-head.sh started (and any node that
# launch/add-node.sh joined to it), and only that one: its processes are found by
# the marker in their environment and their temp dir, and stopped by process id.
# `ray stop` is not used: it stops every Ray process on the machine.
#
#   launch/stop-head.sh [--keep-logs]
# Removes the state directory (token, logs) unless --keep-logs.
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"
keep_logs=no
[ "${1:-}" = --keep-logs ] && keep_logs=yes
if [ ! -f "$STATE/cluster.env" ]; then
  say "no local Ray head recorded in $STATE; nothing to stop"
  exit 0
fi
marker=$(sed -n 's/^DISTNMT_RAY_CLUSTER=//p' "$STATE/cluster.env")
[ -n "$marker" ] || die "$STATE/cluster.env has no DISTNMT_RAY_CLUSTER line; stop its processes by hand"
# Grace period: raylets and workers exit cleanly on SIGTERM within a few seconds.
"$PYTHON" "$LAUNCH_DIR/localray.py" stop --marker "$marker" --temp-dir "$STATE/" --grace 15 >&2
if [ "$keep_logs" = yes ]; then
  rm -f "$STATE/cluster.env" "$STATE/auth_token"
  say "logs kept in $STATE/ray"
else
  rm -rf "$STATE"
fi
