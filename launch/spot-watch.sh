#!/usr/bin/env bash
# Watch the cloud's metadata server for this spot VM's preemption notice; when it
# comes, drain the node in Ray (launch/preempt-node.sh) so that distnmt's workers
# checkpoint before the VM goes. Started in the background on every spot node by
# the spot node types of configs/cluster/{aws,gcp}.yaml (docs/ELASTIC.md).
#
#   launch/spot-watch.sh aws|gcp [--poll SECONDS] [--exec COMMAND]
#
# aws: polls IMDSv2 spot/instance-action (404 until the 2-minute notice; then the
#      time the instance stops), draining with the seconds left minus 10.
# gcp: waits on instance/preempted (TRUE at preemption; 30 s to shut down), grace 25.
# --exec runs COMMAND instead of preempt-node.sh, with the grace seconds appended.
# DISTNMT_METADATA_URL replaces the metadata server's base URL (a local test server).
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"

cloud=${1:-} poll=5 hook=("$LAUNCH_DIR/preempt-node.sh" --grace)
[ $# -gt 0 ] && shift
while [ $# -gt 0 ]; do
  case $1 in
    --poll) poll=$2; shift 2 ;;
    --exec) read -r -a hook <<< "$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

notice_aws() {  # prints the seconds left once the notice is there; fails before
  local base=${DISTNMT_METADATA_URL:-http://169.254.169.254} token action when
  token=$(curl -sf -X PUT "$base/latest/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 300") || return 1
  action=$(curl -sf -H "X-aws-ec2-metadata-token: $token" "$base/latest/meta-data/spot/instance-action") || return 1
  when=$(sed -n 's/.*"time" *: *"\([^"]*\)".*/\1/p' <<< "$action")
  [ -n "$when" ] || die "spot/instance-action without a time: $action"
  echo $(( $(date -d "$when" +%s) - $(date +%s) - 10 ))
}

notice_gcp() {  # blocks until preempted (wait_for_change), then prints the grace
  local base=${DISTNMT_METADATA_URL:-http://metadata.google.internal}
  [ "$(curl -sf -H 'Metadata-Flavor: Google' "$base/computeMetadata/v1/instance/preempted?wait_for_change=true")" = TRUE ] \
    || return 1
  echo 25
}

case $cloud in
  aws|gcp) ;;
  *) die "first argument: aws or gcp, not '$cloud' (see --help)" ;;
esac
say "watching the $cloud metadata server for a preemption notice"
until grace=$("notice_$cloud"); do sleep "$poll"; done
[ "$grace" -gt 0 ] 2>/dev/null || grace=1
say "preemption notice: draining this node, ${grace} s before it goes"
exec "${hook[@]}" "$grace"
