#!/usr/bin/env bash
# Submit a distnmt run to a Ray cluster with `ray job submit`.
#
#   launch/submit.sh [OPTIONS] CONFIG [--set KEY=VALUE ...]
#
#   --address URL   the cluster's job server, e.g. http://127.0.0.1:8265 through
#                   `ray dashboard` or a port-forward (default: RAY_API_SERVER_ADDRESS,
#                   else the local head of launch/start-head.sh, else RAY_ADDRESS)
#   --prepare       run `distnmt prepare` (once, to shared storage) instead of `distnmt train`
#   --env NAME      pass this environment variable through to the job (repeatable);
#                   WANDB_API_KEY, WANDB_MODE, WANDB_ENTITY, WANDB_PROJECT, WANDB_BASE_URL
#                   always are, when set
#   --id ID         submission id (default distnmt-<command>-<config name>-<time>)
#   --no-wait       return once submitted; follow with launch/logs.sh, stop with launch/stop-job.sh
#
# The code goes as the job's working_dir: this checkout without .git, .venv, data,
# prepared/, runs/, bench-results/ (Ray rejects big uploads). Secrets travel in the
# runtime_env through a pipe: never on a command line, never in a file.
# On the local head, relative data and run paths of the config become absolute
# paths of this checkout; on a remote cluster they must be absolute already
# (shared storage), else this stops with a one-line error.
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"

address="" command=train passthrough=() submission_id="" wait=yes
while [ $# -gt 0 ]; do
  case $1 in
    --address) address=$2; shift 2 ;;
    --prepare) command=prepare; shift ;;
    --env) passthrough+=(--env "$2"); shift 2 ;;
    --id) submission_id=$2; shift 2 ;;
    --no-wait) wait=no; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || die "usage: launch/submit.sh [OPTIONS] CONFIG [--set KEY=VALUE ...] (see --help)"
[ -f "$1" ] || die "$1: no such config file"
config=$(realpath "$1"); shift
case $config in
  "$REPO_ROOT"/*) config=${config#"$REPO_ROOT"/} ;;
  *) die "$config is outside $REPO_ROOT: only files of the checkout are uploaded with the job" ;;
esac
command -v ray >/dev/null || die "ray not found; run launch/setup.sh first"
select_cluster "$address"
cd "$REPO_ROOT"

# Absolute data and run paths (local head), or a check that they are (remote).
remote=()
[ "$CLUSTER_KIND" = remote ] && remote=(--remote)
paths=$("$PYTHON" "$LAUNCH_DIR/localray.py" job-paths --command "$command" --config "$config" --base "$REPO_ROOT" "${remote[@]}" -- "$@") || exit 2
path_sets=()
while IFS= read -r item; do
  [ -n "$item" ] && path_sets+=(--set "$item")
done <<< "$paths"

name=$(basename "$config" .yaml)
submission_id=${submission_id:-distnmt-$command-$name-$(date +%Y%m%d-%H%M%S)}
args=()
[ $wait = no ] && args+=(--no-wait)
[ "$CLUSTER_KIND" = local ] && echo "$submission_id" > "$STATE/last-job"
say "submitting $submission_id to $RAY_API_SERVER_ADDRESS ($CLUSTER_KIND): distnmt $command --config $config $* ${path_sets[*]}"
# RAY_LOGGER_LEVEL=info: the cluster's daemons run at warning (see start-head.sh);
# the job's own driver and workers keep Ray's usual INFO lines.
ray job submit "${args[@]}" --submission-id "$submission_id" \
  --runtime-env <("$PYTHON" "$LAUNCH_DIR/localray.py" runtime-env --working-dir "$REPO_ROOT" "${passthrough[@]}" --set RAY_LOGGER_LEVEL=info) \
  -- python -m distnmt.cli "$command" --config "$config" "$@" "${path_sets[@]}"
if [ $wait = no ]; then
  say "follow: launch/logs.sh $submission_id   stop: launch/stop-job.sh $submission_id"
fi
