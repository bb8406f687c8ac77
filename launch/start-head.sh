#!/usr/bin/env bash
# Start a local Ray head node for `ray job submit` (launch/submit.sh), on free ports.
#
#   launch/start-head.sh [--num-cpus N] [--num-gpus N] [--dashboard-host HOST] [-- EXTRA RAY START ARGS]
#
# - Every port Ray would otherwise take by default (6379, 8265, 10001, 52365) is a
#   free one picked now: other people run Ray on shared machines.
# - The dashboard, which is also the job server, listens on 127.0.0.1 unless
#   --dashboard-host says otherwise (0.0.0.0 exposes job submission to the network).
# - Token authentication (Ray 2.60's default) with a token made for this cluster,
#   kept in its state directory (mode 600), not in ~/.ray/auth_token.
# - Its processes carry a marker variable, so launch/stop-head.sh stops exactly them
#   (`ray stop` would stop every Ray cluster on the machine).
# - RAY_LOGGER_LEVEL=warning: at INFO, Ray's runtime-env agent writes each job's
#   runtime_env, env_vars values included (WANDB_API_KEY...), into its log file.
# State: $DISTNMT_RAY_STATE (see launch/lib.sh). Stop with launch/stop-head.sh.
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"

num_cpus="" num_gpus="" dashboard_host=127.0.0.1 extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --num-cpus) num_cpus=$2; shift 2 ;;
    --num-gpus) num_gpus=$2; shift 2 ;;
    --dashboard-host) dashboard_host=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
command -v ray >/dev/null || die "ray not found; run launch/setup.sh first"

if local_cluster_running; then
  # shellcheck disable=SC1091
  . "$STATE/cluster.env"
  say "a head is already running for this checkout: dashboard $DASHBOARD_URL, GCS $GCS_ADDRESS"
  exit 0
fi
# A stale state (crashed or killed cluster): start afresh.
rm -rf "$STATE"
mkdir -p "$STATE" && chmod 700 "$STATE"  # token and logs: this user only
(umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' > "$STATE/auth_token")
marker=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(8))')

resources=()
[ -n "$num_cpus" ] && resources+=(--num-cpus "$num_cpus")
[ -n "$num_gpus" ] && resources+=(--num-gpus "$num_gpus")

# A port found free can be taken before Ray binds it: retry with new ones.
for attempt in 1 2 3; do
  read -r gcs_port dash_port client_port agent_port < <("$PYTHON" "$LAUNCH_DIR/localray.py" free-ports 4)
  say "starting Ray head (attempt $attempt): GCS port $gcs_port, dashboard $dashboard_host:$dash_port"
  if env DISTNMT_RAY_CLUSTER="$marker" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token" \
       RAY_LOGGER_LEVEL=warning \
       ray start --head --disable-usage-stats \
         --port "$gcs_port" --dashboard-host "$dashboard_host" --dashboard-port "$dash_port" \
         --ray-client-server-port "$client_port" --dashboard-agent-listen-port "$agent_port" \
         --temp-dir "$STATE/ray" "${resources[@]}" "${extra[@]}" > "$STATE/ray-start.log" 2>&1; then
    break
  fi
  tail -5 "$STATE/ray-start.log" >&2
  "$PYTHON" "$LAUNCH_DIR/localray.py" stop --marker "$marker" --temp-dir "$STATE/ray" >&2
  [ "$attempt" = 3 ] && die "ray start failed 3 times; log: $STATE/ray-start.log"
done

# Ray writes the GCS address it chose (the machine's IP, even for a local head).
gcs_address=$(cat "$STATE/ray/ray_current_cluster")
host=$dashboard_host
[ "$host" = 0.0.0.0 ] && host=127.0.0.1
cat > "$STATE/cluster.env" <<EOF
GCS_ADDRESS=$gcs_address
DASHBOARD_URL=http://$host:$dash_port
DISTNMT_RAY_CLUSTER=$marker
RAY_TEMP_DIR=$STATE/ray
EOF
say "Ray head up: GCS $gcs_address, dashboard and job server http://$host:$dash_port"
say "state in $STATE; submit with: launch/submit.sh configs/quickstart.yaml; stop with: launch/stop-head.sh"
say "for plain ray CLI commands: eval \"\$(launch/ray-env.sh)\""
