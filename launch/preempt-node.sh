#!/usr/bin/env bash
# Tell Ray that a node is about to be preempted, so that distnmt's workers write a
# checkpoint while there is time and the run continues on the remaining nodes.
#
#   launch/preempt-node.sh [--grace SECONDS] [--node-id HEX] [--address GCS_ADDRESS]
#
# Run it from the node's shutdown hook: the spot instance's SIGTERM (systemd
# ExecStop, a GCP shutdown-script, an AWS spot interruption handler, a Kubernetes
# preStop hook). It drains the node in Ray with reason PREEMPTION and a deadline of
# --grace seconds (default 25; spot instances get 30 s on GCP, 120 s on AWS): Ray
# schedules nothing new there, distnmt's workers see the notice within
# train.preemption_check_every steps and checkpoint, and Ray Train restarts the run
# on the nodes left when the deadline passes. --node-id defaults to this machine's node.
# The address defaults to RAY_ADDRESS, the local head of launch/start-head.sh, or
# else the cluster this node belongs to (what `ray start` recorded on it).
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"

grace=25 node=() address=""
while [ $# -gt 0 ]; do
  case $1 in
    --grace) grace=$2; shift 2 ;;
    --node-id) node=(--node-id "$2"); shift 2 ;;
    --address) address=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ $grace =~ ^[0-9]+$ ]] || die "--grace: '$grace' is not a whole number of seconds"
if [ -z "$address" ]; then
  if [ -n "${RAY_ADDRESS:-}" ]; then address=$RAY_ADDRESS
  elif exports=$(distnmt_cluster env 2>/dev/null); then eval "$exports"; address=$RAY_ADDRESS
  fi
fi
where=()
[ -n "$address" ] && where=(--address "$address")
ray drain-node "${where[@]}" "${node[@]}" --reason DRAIN_NODE_REASON_PREEMPTION \
  --reason-message "preempted: shutting down in ${grace} s" --deadline-remaining-seconds "$grace"
which=${node[1]:-"of this machine"}
say "node $which drained for preemption; Ray Train checkpoints and restarts within ${grace} s"
