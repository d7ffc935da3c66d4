#!/usr/bin/env bash
# Start a local Ray head for `ray job submit` / `llmrec submit` on one machine: the dashboard and Jobs
# API on 127.0.0.1, token authentication on every Ray RPC and HTTP endpoint. (Ray 2.60 maps
# --node-ip-address 127.0.0.1 to the machine's address and its GCS, raylet and agents listen on all
# interfaces; the token, not the address, is what keeps other hosts out.)
#   RAY_PORT (GCS, default 6379)  RAY_DASHBOARD_PORT (Jobs API, default 8265)
#   RAY_AGENT_PORT (dashboard agent, default 52365)  RAY_CLIENT_PORT (Ray client server, default 10001):
#   set both to run a second head (or beside an in-process Ray, whose agent takes 52365) on one machine
#   RAY_NUM_CPUS (default: all)   RAY_HEAD_DIR (the head's record, and Ray's temp dir under ray/;
#   default ~/.llmrec/ray-<dashboard port>: a folder of this user's only, mode 0700 — Ray opens its
#   own temp dir to everyone, so it lives inside — never a shared /tmp name)
# Prints the Jobs API address. Stop it with infra/local/ray-down.sh (same RAY_HEAD_DIR): it signals
# the head's process group only after checking, from the record written here (the GCS server's pid,
# start time and command line), that the group is still this head.
set -euo pipefail
RAY=${RAY:-ray}
PORT=${RAY_PORT:-6379}
DASH=${RAY_DASHBOARD_PORT:-8265}
DIR=${RAY_HEAD_DIR:-$HOME/.llmrec/ray-$DASH}
umask 077
[ -L "$DIR" ] && { echo "$DIR is a symbolic link: refusing to use it" >&2; exit 1; }
mkdir -p "$DIR"
chmod 700 "$DIR"
[ "$(stat -c '%u' "$DIR")" = "$(id -u)" ] || { echo "$DIR is not owned by $(id -un): refusing to use it" >&2; exit 1; }
# Token authentication even on loopback: the Jobs API runs arbitrary code. Clients need
# RAY_AUTH_MODE=token (llmrec submit sets it when ~/.ray/auth_token exists).
export RAY_AUTH_MODE=token
[ -n "${RAY_AUTH_TOKEN:-}" ] || [ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ] || "$RAY" get-auth-token --generate >/dev/null
args=(--head --node-ip-address 127.0.0.1 --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH"
      --dashboard-agent-listen-port "${RAY_AGENT_PORT:-52365}" --ray-client-server-port "${RAY_CLIENT_PORT:-10001}"
      --temp-dir "$DIR/ray" --disable-usage-stats)
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus "$RAY_NUM_CPUS")
[ -f "$DIR/head.pgid" ] && kill -0 -- "-$(cat "$DIR/head.pgid")" 2>/dev/null && {
  echo "a head is already running under $DIR (process group $(cat "$DIR/head.pgid")): infra/local/ray-down.sh first" >&2; exit 1; }
# a head on this machine alone: Ray Train's preemption watcher (an actor, so a process, per run) has
# no other node to watch (ray_jobs.runtime.LOCAL_RAY_ENV for the in-process local Ray)
export RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="${RAY_TRAIN_ENABLE_PREEMPTION_WATCHER:-0}"
# `ray start` runs as the leader of a new session: every process of this head (GCS, raylet,
# dashboard and its agents, the client server, workers and jobs) inherits its process group, which
# ray-down.sh stops by the number recorded here, never by matching command lines.
# shellcheck disable=SC2016  # $$, $0 and $@ belong to the inner shell
setsid -w bash -c 'echo $$ > "$0/head.pgid"; exec "$@"' "$DIR" "$RAY" start "${args[@]}" >"$DIR/start.log" 2>&1 \
  || { cat "$DIR/start.log" >&2; exit 1; }
pgid=$(cat "$DIR/head.pgid")
# The head's record: the GCS server of this group (it lives as long as the head), with its start time
# (field 22 of /proc/<pid>/stat, clock ticks since boot) and a hash of its command line (it names $DIR).
gcs=$(pgrep -g "$pgid" -f gcs_server | head -n 1 || true)
[ -n "$gcs" ] || { echo "no GCS server in process group $pgid: the head did not start" >&2; cat "$DIR/start.log" >&2; exit 1; }
started=$(awk '{print $22}' "/proc/$gcs/stat")
cmd=$(tr '\0' ' ' < "/proc/$gcs/cmdline" | sha256sum | cut -d' ' -f1)
printf 'pgid=%s\npid=%s\nstart=%s\ncmd=%s\n' "$pgid" "$gcs" "$started" "$cmd" > "$DIR/head.record"
for _ in $(seq 1 60); do
  # any HTTP answer (401 without the token included) means the Jobs API is up
  python3 -c "
import sys, urllib.error, urllib.request as u
try: u.urlopen('http://127.0.0.1:$DASH/api/version', timeout=2)
except urllib.error.HTTPError: pass
except OSError: sys.exit(1)" && break
  sleep 1
done
echo "http://127.0.0.1:$DASH"
