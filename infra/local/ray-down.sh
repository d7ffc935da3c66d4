#!/usr/bin/env bash
# Stop the head started by ray-up.sh: its whole process group, TERM then KILL — only after checking
# that the group is still that head: the process recorded in $RAY_HEAD_DIR/head.record (the GCS
# server) must exist with the recorded start time and command line, in the recorded process group.
# A stale record (the head is gone, its numbers reused) or a planted one stops nothing and says so.
# Other Ray instances on the machine, other heads included, are left alone.
set -uo pipefail
DASH=${RAY_DASHBOARD_PORT:-8265}
DIR=${RAY_HEAD_DIR:-$HOME/.llmrec/ray-$DASH}
RECORD="$DIR/head.record"
[ -f "$RECORD" ] || { echo "no head recorded under $DIR ($RECORD missing)"; exit 0; }
[ -L "$RECORD" ] && { echo "$RECORD is a symbolic link: stopping nothing" >&2; exit 1; }
value() { sed -n "s/^$1=//p" "$RECORD" | head -n 1; }
pgid=$(value pgid); pid=$(value pid); start=$(value start); cmd=$(value cmd)
for v in "$pgid" "$pid" "$start"; do
  [[ "$v" =~ ^[0-9]+$ ]] || { echo "$RECORD: not a head record: stopping nothing" >&2; exit 1; }
done
stale() { echo "$RECORD is stale ($1): no process of that head is left to stop; stopping nothing"; rm -f "$RECORD" "$DIR/head.pgid"; exit 0; }
[ -r "/proc/$pid/stat" ] || stale "process $pid is gone"
[ "$(awk '{print $22}' "/proc/$pid/stat")" = "$start" ] || stale "process $pid started at another time: another process"
[ "$(tr '\0' ' ' < "/proc/$pid/cmdline" | sha256sum | cut -d' ' -f1)" = "$cmd" ] || stale "process $pid runs another command"
[ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pgid" ] || stale "process $pid left group $pgid"
running() {  # members of the group that have not exited (exited ones wait, as zombies, to be reaped)
  ps -eo pgid=,stat= | awk -v g="$pgid" '$1 == g && $2 !~ /^Z/' | grep -q .
}
# RAY_DOWN_GRACE seconds (default 5) between TERM and KILL: enough for a running job's SIGTERM handler
# to end its MLflow run; the head's own processes do not exit on TERM sooner than Ray's 16 s stop grace.
kill -TERM -- "-$pgid" 2>/dev/null || stale "process group $pgid is gone"
for _ in $(seq 1 $((${RAY_DOWN_GRACE:-5} * 4))); do
  running || break
  sleep 0.25
done
running && kill -KILL -- "-$pgid" 2>/dev/null
for _ in $(seq 1 20); do running || break; sleep 0.5; done
rm -f "$RECORD" "$DIR/head.pgid"
echo "stopped Ray under $DIR (process group $pgid)"
