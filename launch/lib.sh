# shellcheck shell=bash
# Shared by the launch/ scripts (sourced, never run). Bash, with set -euo pipefail
# already on in the caller.
#
# A local Ray cluster started by start-head.sh keeps its state in one private
# directory, $DISTNMT_RAY_STATE (default /tmp/distnmt-ray-<uid>-<hash of the checkout>):
#   cluster.env   addresses, the marker that tags its processes, its Ray temp dir
#   auth_token    the cluster's Ray auth token (mode 600); Ray 2.60 enables token auth
#   ray/          Ray's --temp-dir: sessions, logs, sockets (short path: sockets
#                 must fit in 107 bytes)
#   last-job      id of the last job submit.sh sent there

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)

# The project's venv when there is one (launch/setup.sh makes it), else the PATH's.
if [ -x "$REPO_ROOT/${DISTNMT_VENV:-.venv}/bin/python" ]; then
  PYTHON="$REPO_ROOT/${DISTNMT_VENV:-.venv}/bin/python"
  PATH="$REPO_ROOT/${DISTNMT_VENV:-.venv}/bin:$PATH"
else
  PYTHON=${PYTHON:-python3}
fi

# One state directory per checkout, so two clones (or users) never share a cluster.
default_state=/tmp/distnmt-ray-$(id -u)-$(printf '%s' "$REPO_ROOT" | sha1sum | cut -c1-8)
STATE=${DISTNMT_RAY_STATE:-$default_state}

# local or remote, set by select_cluster for the calling script.
# shellcheck disable=SC2034
CLUSTER_KIND=""

die() { echo "[launch] error: $*" >&2; exit 2; }
say() { echo "[launch] $*" >&2; }

# True if a cluster.env exists and at least one of its processes is alive.
local_cluster_running() {
  [ -f "$STATE/cluster.env" ] || return 1
  local marker pids
  marker=$(sed -n 's/^DISTNMT_RAY_CLUSTER=//p' "$STATE/cluster.env")
  pids=$("$PYTHON" "$LAUNCH_DIR/localray.py" pids --marker "$marker" --temp-dir "$STATE/ray")
  [ -n "$pids" ]
}

# Export what the ray CLI and drivers need to reach the local cluster in $STATE:
# GCS address, job server URL, and token auth pointing at this cluster's own token
# (not ~/.ray/auth_token, which other clusters of this user may rewrite).
use_local_cluster() {
  [ -f "$STATE/cluster.env" ] || die "no local Ray head in $STATE; start one with launch/start-head.sh (or pass --address)"
  # shellcheck disable=SC1091
  . "$STATE/cluster.env"
  export RAY_ADDRESS="$GCS_ADDRESS"
  export RAY_API_SERVER_ADDRESS="$DASHBOARD_URL"
  export RAY_AUTH_MODE=token
  export RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
}

# For a remote cluster: the user gave an address (flag or RAY_API_SERVER_ADDRESS /
# RAY_ADDRESS). A token given as RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH turns token
# auth on for the CLI, which Ray does not do by itself.
use_remote_cluster() {
  local address=$1
  export RAY_API_SERVER_ADDRESS="$address"
  if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; }; then
    export RAY_AUTH_MODE=token
  fi
}

# Pick the cluster: the --address value or RAY_API_SERVER_ADDRESS, else the local
# head of $STATE, else RAY_ADDRESS. Sets CLUSTER_KIND to local or remote.
# shellcheck disable=SC2034  # CLUSTER_KIND is read by the calling script
select_cluster() {
  local address=${1:-${RAY_API_SERVER_ADDRESS:-}}
  if [ -n "$address" ]; then
    CLUSTER_KIND=remote
    use_remote_cluster "$address"
  elif [ -f "$STATE/cluster.env" ]; then
    CLUSTER_KIND=local
    use_local_cluster
  elif [ -n "${RAY_ADDRESS:-}" ]; then
    CLUSTER_KIND=remote
    use_remote_cluster "$RAY_ADDRESS"
  else
    die "no cluster: start a local head with launch/start-head.sh, or pass --address http://HEAD:8265"
  fi
}
