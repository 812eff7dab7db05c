#!/usr/bin/env bash
# Try the department set-up on one machine: N replicas of the app on loopback ports behind
# Debian's nginx with sticky sessions (deploy/ctapp.nginx.conf.in). Runs in the foreground;
# Ctrl-C (or SIGTERM) stops everything it started.
#
#   deploy/run-replicas.sh [N]                  # default 2 replicas, proxy on 127.0.0.1:8080
#   CTAPP_DATABASE_URL=postgresql://user:pw@host:5432/ctapp deploy/run-replicas.sh 3
#
# Settings (environment): PROXY_LISTEN (127.0.0.1:8080), SERVER_NAME (localhost; a public name
# also joins Streamlit's allowed hosts), FIRST_PORT (8501: replicas use FIRST_PORT..+N-1),
# RUN_DIR (a new temporary folder: generated nginx config, logs, replica-K.pid),
# STREAMLIT_SERVER_COOKIE_SECRET (generated: all replicas must share it), SECRETS_FILE
# (.streamlit/secrets.toml: with an [auth] section, sign-in is on and the proxy serves /media/
# only to signed-in browsers). Without CTAPP_DATABASE_URL the replicas share the SQLite audit
# log, which holds on one machine only. The proxy refuses a Host other than localhost,
# 127.0.0.1 and SERVER_NAME (421).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2}
[[ "$n" =~ ^[1-9][0-9]?$ ]] || { echo "usage: $0 [number of replicas, 1-99]" >&2; exit 2; }
listen=${PROXY_LISTEN:-127.0.0.1:8080}
server_name=${SERVER_NAME:-localhost}
first_port=${FIRST_PORT:-8501}
secrets_file=${SECRETS_FILE:-.streamlit/secrets.toml}
run_dir=${RUN_DIR:-$(mktemp -d -t ctapp-replicas-XXXXXX)}
python=.venv/bin/python
[ -x "$python" ] || python=python3
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$nginx_bin" ] || { echo "nginx is not installed: apt-get install nginx-light (or nginx)" >&2; exit 1; }
export STREAMLIT_SERVER_COOKIE_SECRET=${STREAMLIT_SERVER_COOKIE_SECRET:-$("$python" -c 'import secrets; print(secrets.token_hex(32))')}
mkdir -p "$run_dir/tmp"

pids=()
stop_all() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ "${nginx_tmp:-}" = "$run_dir/tmp" ] || rm -rf "${nginx_tmp:-}"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

names=(localhost 127.0.0.1)
[ "$server_name" = localhost ] || names+=("$server_name")
hosts=() allowed_hosts=""
for name in "${names[@]}"; do
  hosts+=(--server.allowedHosts "$name")
  allowed_hosts+="    $name 1;"$'\n'
done
secrets=() media_needs_sign_in=0
if [ -f "$secrets_file" ]; then
  secrets=(--secrets.files "$secrets_file")
  "$python" -c 'import sys, tomllib; sys.exit("auth" not in tomllib.load(open(sys.argv[1], "rb")))' "$secrets_file" \
    && media_needs_sign_in=1
fi
upstreams=""
for ((k = 0; k < n; k++)); do
  port=$((first_port + k))
  "$python" -m streamlit run app.py --server.headless true --server.address 127.0.0.1 --server.port "$port" \
    "${hosts[@]}" "${secrets[@]}" >"$run_dir/replica-$k.log" 2>&1 &
  pids+=($!)
  echo $! >"$run_dir/replica-$k.pid"
  upstreams+="    server 127.0.0.1:$port max_fails=2 fail_timeout=10s;"$'\n'
done

user_line=""
nginx_tmp="$run_dir/tmp"
if [ "$(id -u)" = 0 ]; then
  # nginx's workers drop root to nobody; their temporary files go to a folder of theirs that
  # they can reach whatever the permissions of the folders above RUN_DIR.
  user_line="user nobody nogroup;"
  nginx_tmp=$(mktemp -d -t ctapp-nginx-XXXXXX)
  chown nobody:nogroup "$nginx_tmp"
fi
"$python" - "$run_dir/ctapp.conf" "$upstreams" "$listen" "$server_name" "$allowed_hosts" "$media_needs_sign_in" <<'PY'
import sys
from pathlib import Path
out, upstreams, listen, name, allowed_hosts, media_needs_sign_in = sys.argv[1:]
text = Path("deploy/ctapp.nginx.conf.in").read_text()
for key, value in {"@UPSTREAMS@": upstreams.rstrip("\n"), "@LISTEN@": listen, "@SERVER_NAME@": name,
                   "@ALLOWED_HOSTS@": allowed_hosts.rstrip("\n"), "@MEDIA_NEEDS_SIGN_IN@": media_needs_sign_in}.items():
    text = text.replace(key, value)
Path(out).write_text(text)
PY
cat >"$run_dir/nginx.conf" <<CONF
$user_line
worker_processes 1;
pid $run_dir/nginx.pid;
error_log $run_dir/nginx-error.log warn;
events { worker_connections 1024; }
http {
    log_format ctapp '\$remote_addr [\$time_local] "\$request" \$status upstream=\$upstream_addr route=\$cookie_ctapp_route';
    access_log $run_dir/nginx-access.log ctapp;
    client_body_temp_path $nginx_tmp/body;
    proxy_temp_path $nginx_tmp/proxy;
    fastcgi_temp_path $nginx_tmp/fastcgi;
    uwsgi_temp_path $nginx_tmp/uwsgi;
    scgi_temp_path $nginx_tmp/scgi;
    include $run_dir/ctapp.conf;
}
CONF
"$nginx_bin" -t -q -p "$run_dir" -c "$run_dir/nginx.conf"
"$nginx_bin" -p "$run_dir" -c "$run_dir/nginx.conf" -g "daemon off;" &
pids+=($!)
echo $! >"$run_dir/nginx.pid.fg"

healthy() { "$python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null; }
for ((k = 0; k < n; k++)); do
  url="http://127.0.0.1:$((first_port + k))/_stcore/health"
  for ((t = 0; t < 240; t++)); do
    healthy "$url" && break
    kill -0 "${pids[$k]}" 2>/dev/null || { echo "replica $k exited: $run_dir/replica-$k.log" >&2; exit 1; }
    sleep 0.5
  done
done
healthy "http://$listen/_stcore/health" || { echo "the proxy does not answer on $listen" >&2; exit 1; }
sign_in="sign-in off"
[ "$media_needs_sign_in" = 1 ] && sign_in="sign-in on, /media/ for signed-in browsers only"
echo "ready: http://$listen ($n replicas on ports $first_port-$((first_port + n - 1)); $sign_in; logs and pids in $run_dir)"
wait "${pids[-1]}"
