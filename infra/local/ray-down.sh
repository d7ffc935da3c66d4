#!/usr/bin/env bash
# Stop the head started by ray-up.sh: every process of that Ray instance (found by its temp dir),
# by pid, TERM then KILL. Leaves other Ray instances on the machine alone.
set -uo pipefail
DASH=${RAY_DASHBOARD_PORT:-8265}
DIR=${RAY_HEAD_DIR:-/tmp/llmrec-ray-$DASH}
pids=$(pgrep -f -- "$DIR" || true)
[ -z "$pids" ] && { echo "no Ray processes under $DIR"; exit 0; }
kill $pids 2>/dev/null || true
for _ in $(seq 1 20); do
  alive=$(for p in $pids; do kill -0 "$p" 2>/dev/null && echo "$p"; done)
  [ -z "$alive" ] && break
  sleep 0.5
done
[ -n "${alive:-}" ] && kill -9 $alive 2>/dev/null || true
echo "stopped Ray under $DIR"
