#!/usr/bin/env bash
# A Ray head on this machine, for trying the cluster path (`ray job submit`) locally.
#
#   infra/local_cluster.sh start     # head on 127.0.0.1 with token authentication on
#   infra/local_cluster.sh stop      # stops this head only (not other Ray instances, unlike `ray stop`)
#   infra/local_cluster.sh status
#
# Token authentication (Ray 2.60): `ray start --head` turns it on by itself whenever
# ~/.ray/auth_token exists (any earlier ray.init() may have written one), and then a
# `ray job submit` without RAY_AUTH_MODE=token sends no token and fails with
# "AuthenticationError: Missing authentication token". This script states the mode instead
# of depending on what ran before: it makes sure a token exists (`ray get-auth-token
# --generate` writes ~/.ray/auth_token once and keeps it), starts the head with
# RAY_AUTH_MODE=token, and clients then need `export RAY_AUTH_MODE=token` (README.md).
#
# Jobs inherit the head's environment: MLFLOW_TRACKING_URI, if unset, becomes this checkout's
# ./mlflow.db, the store the laptop quickstart writes (a job runs in a throwaway copy of the
# working dir, where the default ./mlflow.db would be lost).
#
# Environment (all optional):
#   LOCAL_RAY_PORT             GCS port (default 6379)
#   LOCAL_RAY_DASHBOARD_PORT   dashboard and job API port (default 8265)
#   LOCAL_RAY_TEMP_DIR         Ray's session folder, also holds this script's pid and log (default /tmp/ray)
#   LOCAL_RAY_NUM_CPUS         CPUs the head offers to trials (default: all)
#   LOCAL_RAY_ARGS             further `ray start` options, e.g. other ports
set -euo pipefail

command="${1:-start}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${LOCAL_RAY_PORT:-6379}"
dashboard_port="${LOCAL_RAY_DASHBOARD_PORT:-8265}"
temp_dir="${LOCAL_RAY_TEMP_DIR:-/tmp/ray}"
pid_file="$temp_dir/local_cluster.pid"
log_file="$temp_dir/local_cluster.log"
dashboard="http://127.0.0.1:${dashboard_port}"

is_running() {
  [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

dashboard_answers() {
  # Any HTTP answer counts (401 with token auth on): the job API is up.
  python - "$dashboard/api/version" <<'EOF'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=3).close()
except urllib.error.HTTPError:
    pass
except OSError:
    sys.exit(1)
EOF
}

start() {
  if is_running; then
    echo "local Ray head already running (pid $(cat "$pid_file")), dashboard $dashboard"
    return 0
  fi
  mkdir -p "$temp_dir"
  ray get-auth-token --generate >/dev/null  # makes ~/.ray/auth_token once, unless a token is set already
  export RAY_AUTH_MODE=token
  export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$root/mlflow.db}"
  local cpus=()
  [[ -n "${LOCAL_RAY_NUM_CPUS:-}" ]] && cpus=("--num-cpus=$LOCAL_RAY_NUM_CPUS")
  # --block in a session of its own: SIGTERM to it stops exactly what it started (see stop).
  # shellcheck disable=SC2086  # LOCAL_RAY_ARGS is a list of options
  setsid ray start --head --block --disable-usage-stats \
    --node-ip-address=127.0.0.1 --port="$port" \
    --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" \
    --temp-dir="$temp_dir" "${cpus[@]}" ${LOCAL_RAY_ARGS:-} >"$log_file" 2>&1 </dev/null &
  echo $! >"$pid_file"
  for _ in $(seq 180); do
    if ! is_running; then
      echo "local_cluster.sh: ray start exited; its output ($log_file):" >&2
      tail -n 30 "$log_file" >&2
      rm -f "$pid_file"
      return 1
    fi
    if dashboard_answers; then
      echo "local Ray head running (pid $(cat "$pid_file"), token authentication on)"
      echo "  dashboard and job API: $dashboard   jobs log to MLflow at $MLFLOW_TRACKING_URI"
      echo "  before 'ray job submit' in this shell:  export RAY_AUTH_MODE=token"
      return 0
    fi
    sleep 1
  done
  echo "local_cluster.sh: the dashboard at $dashboard did not answer in 180 s (log: $log_file)" >&2
  stop
  return 1
}

stop() {
  if ! is_running; then
    rm -f "$pid_file"
    echo "no local Ray head running"
    return 0
  fi
  local pid
  pid="$(cat "$pid_file")"
  kill -TERM "$pid"
  for _ in $(seq 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  # Whatever the head left in its session (it started them all).
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pid_file"
  echo "local Ray head stopped (pid $pid)"
}

case "$command" in
  start) start ;;
  stop) stop ;;
  status)
    if is_running; then echo "running (pid $(cat "$pid_file")), dashboard $dashboard"; else echo "stopped"; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
