#!/usr/bin/env bash
# Stop the head started by ray-up.sh: its whole process group (recorded in $RAY_HEAD_DIR/head.pgid),
# TERM then KILL. Other Ray instances on the machine, other heads included, are left alone.
set -uo pipefail
DASH=${RAY_DASHBOARD_PORT:-8265}
DIR=${RAY_HEAD_DIR:-/tmp/llmrec-ray-$DASH}
PGID_FILE="$DIR/head.pgid"
[ -f "$PGID_FILE" ] || { echo "no head recorded under $DIR ($PGID_FILE missing)"; exit 0; }
pgid=$(cat "$PGID_FILE")
[[ "$pgid" =~ ^[0-9]+$ ]] || { echo "$PGID_FILE: not a process group id: $pgid" >&2; exit 1; }
running() {  # members of the group that have not exited (exited ones wait, as zombies, to be reaped)
  ps -eo pgid=,stat= | awk -v g="$pgid" '$1 == g && $2 !~ /^Z/' | grep -q .
}
kill -TERM -- "-$pgid" 2>/dev/null || { rm -f "$PGID_FILE"; echo "no Ray processes left in group $pgid"; exit 0; }
for _ in $(seq 1 40); do
  running || break
  sleep 0.5
done
running && kill -KILL -- "-$pgid" 2>/dev/null
for _ in $(seq 1 20); do running || break; sleep 0.5; done
rm -f "$PGID_FILE"
echo "stopped Ray under $DIR (process group $pgid)"
