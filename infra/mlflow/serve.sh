#!/usr/bin/env bash
# MLflow tracking server for the team's sweeps.
#
#   infra/mlflow/serve.sh start [--port 5000] [--host 127.0.0.1] [--workers 2] [--no-auth]
#   infra/mlflow/serve.sh stop | status
#   infra/mlflow/serve.sh foreground [...]     # for systemd / containers (exec, no PID file)
#
# Binds 127.0.0.1 by default: reach it through an SSH tunnel
# (ssh -N -L 5000:127.0.0.1:5000 user@vm) or kubectl port-forward, never by
# opening the port to the world.
#
# Environment (all optional):
#   MLFLOW_SERVER_STATE_DIR      PID file, log, auth db, secret key
#                                (default ${XDG_STATE_HOME:-~/.local/state}/vit-sweeps-mlflow)
#   MLFLOW_BACKEND_STORE_URI     runs/params/metrics store (default sqlite:///$STATE_DIR/mlflow.db);
#                                for a team use PostgreSQL:
#                                postgresql+psycopg2://mlflow:PASS@db-host:5432/mlflow
#                                (pip install psycopg2-binary)
#   MLFLOW_ARTIFACTS_DESTINATION where the server stores artifacts it proxies
#                                (default $STATE_DIR/artifacts; e.g. s3://bucket/prefix/mlflow-artifacts,
#                                credentials from the standard AWS chain / instance profile)
#   MLFLOW_SERVE_AUTH            1 (default) turns basic auth on (needs `pip install "mlflow[auth]"`)
#   MLFLOW_AUTH_ADMIN_USERNAME   admin user created on first start (default admin)
#   MLFLOW_AUTH_ADMIN_PASSWORD   its password; required on first start with auth on
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key; generated once into $STATE_DIR/secret_key if unset
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  default false here: the job runner (about 7 extra
#                                processes) serves MLflow's GenAI features, which sweeps do not use
#   MLFLOW_BIN                   mlflow executable (default: mlflow on PATH)
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command="${1:-start}"
[[ $# -gt 0 ]] && shift

host="${MLFLOW_SERVER_HOST:-127.0.0.1}"
port="${MLFLOW_SERVER_PORT:-5000}"
workers="${MLFLOW_SERVER_WORKERS:-2}"
auth="${MLFLOW_SERVE_AUTH:-1}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --no-auth) auth=0; shift ;;
    *) echo "serve.sh: unknown option '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
state_dir="${MLFLOW_SERVER_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/vit-sweeps-mlflow}"
mkdir -p "$state_dir"
state_dir="$(cd "$state_dir" && pwd)"
pid_file="$state_dir/mlflow-server.pid"
log_file="$state_dir/mlflow-server.log"
url="http://${host}:${port}"
mlflow_bin="${MLFLOW_BIN:-mlflow}"

is_running() {
  [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

configure_auth() {
  # Rendered config, secret key and user db live in the state dir, never in git.
  local admin_user="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
  local rendered="$state_dir/basic_auth.ini"
  sed -e "s#@STATE_DIR@#${state_dir}#g" -e "s#@ADMIN_USERNAME@#${admin_user}#g" \
    "$script_dir/basic_auth.ini.template" > "$rendered"
  export MLFLOW_AUTH_CONFIG_PATH="$rendered"
  if [[ ! -f "$state_dir/basic_auth.db" && -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]]; then
    echo "serve.sh: basic auth is on and no user database exists yet in $state_dir:" \
      "set MLFLOW_AUTH_ADMIN_PASSWORD for the first start (or pass --no-auth)" >&2
    exit 1
  fi
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    # Must stay the same across restarts and workers, or CSRF tokens stop validating.
    if [[ ! -f "$state_dir/secret_key" ]]; then
      (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$state_dir/secret_key")
    fi
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$state_dir/secret_key")"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
}

server_args() {
  args=(server
    --host "$host" --port "$port" --workers "$workers"
    --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$state_dir/mlflow.db}"
    --serve-artifacts
    --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-$state_dir/artifacts}")
  if [[ "$auth" == "1" ]]; then
    configure_auth
    args+=(--app-name basic-auth)
  fi
}

wait_until_healthy() {
  # /health stays unauthenticated under basic auth, so it works either way.
  local probe_host="$host"
  [[ "$probe_host" == "0.0.0.0" ]] && probe_host=127.0.0.1
  for _ in $(seq 1 120); do
    if ! is_running; then
      echo "serve.sh: mlflow server exited during start-up; see $log_file" >&2
      tail -n 20 "$log_file" >&2 || true
      exit 1
    fi
    if python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "http://${probe_host}:${port}/health" 2>/dev/null; then
      return 0
    fi
    sleep 1
  done
  echo "serve.sh: mlflow server did not answer ${url}/health within 120 s; see $log_file" >&2
  exit 1
}

case "$command" in
  start)
    if is_running; then
      echo "serve.sh: already running (pid $(cat "$pid_file")) at $url"; exit 0
    fi
    server_args
    # setsid: own process group, so `stop` can end the server and all its workers at once.
    setsid "$mlflow_bin" "${args[@]}" >>"$log_file" 2>&1 < /dev/null &
    echo $! > "$pid_file"
    echo "$url" > "$state_dir/url"
    wait_until_healthy
    echo "MLflow server running (pid $(cat "$pid_file"), log $log_file)"
    echo "MLFLOW_TRACKING_URI=$url"
    ;;
  foreground)
    server_args
    echo "MLFLOW_TRACKING_URI=$url"
    exec "$mlflow_bin" "${args[@]}"
    ;;
  stop)
    if ! is_running; then
      echo "serve.sh: not running (no live pid in $pid_file)"; rm -f "$pid_file"; exit 0
    fi
    pid="$(cat "$pid_file")"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pid_file" "$state_dir/url"
    echo "MLflow server stopped (pid $pid)"
    ;;
  status)
    if is_running; then echo "running (pid $(cat "$pid_file")) at $(cat "$state_dir/url" 2>/dev/null || echo "$url")"; else echo "stopped"; exit 3; fi
    ;;
  *)
    echo "serve.sh: unknown command '$command' (use start, stop, status or foreground)" >&2
    exit 2
    ;;
esac
