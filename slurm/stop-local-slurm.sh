#!/usr/bin/env bash
# stop-local-slurm.sh - stop the cluster started by slurm/start-local-slurm.sh.
#   1. cancels all jobs while slurmctld is up (slurmstepd then kills the job processes);
#   2. stops slurmd(s), slurmctld, slurmdbd, MariaDB and munged, each by the PID in its pid
#      file and only if that process carries this cluster's marker in its environment;
#   3. kills (by PID) any leftover process of this cluster - one with the marker, or a
#      slurmstepd holding a file under the cluster directory open - and its descendants.
#   --purge : also delete $SLURM_LOCAL_DIR (state, logs, accounting database).
# Safe to run when nothing is running.
# Usage: [SLURM_LOCAL_DIR=/tmp/hpcserve-slurm] bash slurm/stop-local-slurm.sh [--purge]
set -uo pipefail
BASE=${SLURM_LOCAL_DIR:-/tmp/hpcserve-slurm}
PURGE=0
case "${1:-}" in
  "") ;;
  --purge) PURGE=1 ;;
  *) echo "stop-local-slurm.sh: unknown argument '$1' (use --purge or no argument)" >&2; exit 2 ;;
esac
CONF=$BASE/etc/slurm.conf
RUN=$BASE/run
MARKER="HPCSERVE_SLURM_LOCAL_DIR=$BASE"
export PATH=$PATH:/usr/sbin:/sbin
log() { printf '[stop-local-slurm %s] %s\n' "$(date +%T)" "$*" >&2; }

[ -d "$BASE" ] || { log "nothing at $BASE"; exit 0; }
if [ ! -e "$BASE/.hpcserve-slurm-cluster" ]; then
  log "$BASE was not created by start-local-slurm.sh; refusing to touch it"; exit 1
fi

has_marker() { { tr '\0' '\n' < "/proc/$1/environ"; } 2>/dev/null | grep -qxF "$MARKER"; }
alive() { kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
stop_pid() {  # stop_pid PID NAME : SIGTERM, wait up to 20 s, then SIGKILL
  local pid=$1 name=$2 i
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 1 100); do alive "$pid" || { log "stopped $name ($pid)"; return 0; }; sleep 0.2; done
  log "$name ($pid) ignored SIGTERM; sending SIGKILL"; kill -KILL "$pid" 2>/dev/null
  for i in $(seq 1 25); do alive "$pid" || return 0; sleep 0.2; done
}
stop_pidfile() {
  local pf=$1 pid
  [ -s "$pf" ] || return 0
  pid=$(tr -dc '0-9' < "$pf")
  if [ -n "$pid" ] && has_marker "$pid"; then stop_pid "$pid" "$(basename "$pf" .pid)"; fi
  rm -f "$pf"
}
descendants() {
  local k
  for k in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$k"; descendants "$k"; done
}

# 1. cancel every job so that slurmstepd ends the job processes
ctld_pid=$(tr -dc '0-9' < "$RUN/slurmctld.pid" 2>/dev/null || true)
if [ -n "$ctld_pid" ] && has_marker "$ctld_pid" && SLURM_CONF=$CONF timeout 10 squeue -h >/dev/null 2>&1; then
  jobs=$(SLURM_CONF=$CONF timeout 10 squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    SLURM_CONF=$CONF timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 1 75); do   # KillWait=5 s plus cleanup
      [ -z "$(SLURM_CONF=$CONF timeout 10 squeue -h -o %A 2>/dev/null | head -1)" ] && break
      sleep 0.2
    done
  fi
fi

# 2. daemons, in reverse order of start
for pf in "$RUN"/slurmd-*.pid; do [ -e "$pf" ] && stop_pidfile "$pf"; done
stop_pidfile "$RUN/slurmctld.pid"
stop_pidfile "$RUN/slurmdbd.pid"
stop_pidfile "$RUN/mariadbd.pid"
stop_pidfile "$RUN/munged.pid"

# 3. leftovers: processes with the marker (slurmscriptd, a daemon whose pid file is gone)
#    and this cluster's slurmstepd processes (no marker, but they hold our slurmd log open),
#    each with all its descendants (the job tasks).
ours_stepd() {
  [ "$(cat "/proc/$1/comm" 2>/dev/null)" = slurmstepd ] || return 1
  ls -l "/proc/$1/fd" 2>/dev/null | grep -qF -- "-> $BASE/"
}
left=""
for d in /proc/[0-9]*; do
  p=${d#/proc/}
  [ "$p" = $$ ] && continue
  alive "$p" || continue
  if has_marker "$p" || ours_stepd "$p"; then left="$left $p $(descendants "$p")"; fi
done
left=$(echo $left | tr ' ' '\n' | sort -un | tr '\n' ' ')
if [ -n "${left// /}" ]; then
  log "killing leftover processes:$(for p in $left; do printf ' %s(%s)' "$p" "$(cat /proc/$p/comm 2>/dev/null)"; done)"
  for p in $left; do kill -KILL "$p" 2>/dev/null; done
  sleep 0.5
fi
rm -f "$BASE/settings"

if [ "$PURGE" = 1 ]; then
  rm -rf "$BASE" && log "removed $BASE"
fi
log "done"
