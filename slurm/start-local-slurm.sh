#!/usr/bin/env bash
# start-local-slurm.sh - a real multi-node Slurm cluster on this one machine, for trying
# hpcserve, for tests and for CI.
#
#   * Debian 12 packages (Slurm 22.05); missing ones are installed with apt-get (needs root).
#   * N "nodes" = N slurmd daemons on this host (`slurmd -N nodeK`), each on its own port on
#     127.0.0.1, so `sbatch --nodes=2` + `srun` really runs one task per node.
#   * Private munged (own key and socket), slurmctld and, by default, MariaDB + slurmdbd so
#     that `sacct` works. Everything lives under $SLURM_LOCAL_DIR.
#   * Idempotent: a healthy cluster started with the same settings is reused (said on stderr);
#     otherwise what is left of an old one is stopped and a fresh one is started.
#
# Usage:   eval "$(bash slurm/start-local-slurm.sh)"       # exports SLURM_CONF
#          bash slurm/start-local-slurm.sh --check          # exit 0 (and print the export
#                                                           # line) only if already running
# stdout carries only `export SLURM_CONF=...`; progress goes to stderr.
#
# Settings (environment variables):
#   SLURM_LOCAL_DIR         base directory                                  [/tmp/hpcserve-slurm]
#   SLURM_LOCAL_NODES       number of slurmd nodes (head + prefill + decode) [3]
#   SLURM_LOCAL_CPUS        CPUs advertised per node (may exceed real cores) [4]
#   SLURM_LOCAL_MEM_MB      RealMemory per node in MB                        [4000]
#   SLURM_LOCAL_ACCOUNTING  1 = MariaDB + slurmdbd (sacct works), 0 = none   [1]
#   SLURM_LOCAL_PORT_BASE   BASE slurmctld, BASE+1 slurmdbd, BASE+2 MariaDB,
#                           BASE+10.. slurmd nodes                           [17810]
#   SLURM_LOCAL_TIMEOUT     seconds to wait for all nodes to become idle     [60]
#   SLURM_LOCAL_INSTALL     1 = apt-get install missing packages, 0 = fail   [1]
#   SLURM_LOCAL_EXTRA_CONF  extra slurm.conf lines, appended (a later key wins) []
set -euo pipefail

BASE=${SLURM_LOCAL_DIR:-/tmp/hpcserve-slurm}
NODES=${SLURM_LOCAL_NODES:-3}
CPUS=${SLURM_LOCAL_CPUS:-4}
MEM=${SLURM_LOCAL_MEM_MB:-4000}
ACCT=${SLURM_LOCAL_ACCOUNTING:-1}
PORT_BASE=${SLURM_LOCAL_PORT_BASE:-17810}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
INSTALL=${SLURM_LOCAL_INSTALL:-1}
EXTRA_CONF=${SLURM_LOCAL_EXTRA_CONF:-}
CHECK_ONLY=0
case "${1:-}" in
  "") ;;
  --check) CHECK_ONLY=1 ;;
  -h|--help) sed -n '2,28p' "$0" >&2; exit 0 ;;
  *) echo "start-local-slurm.sh: unknown argument '$1' (use --check or no argument)" >&2; exit 2 ;;
esac

CTLD_PORT=$PORT_BASE
DBD_PORT=$((PORT_BASE + 1))
DB_PORT=$((PORT_BASE + 2))
SLURMD_PORT0=$((PORT_BASE + 10))
ETC=$BASE/etc
CONF=$ETC/slurm.conf
MUNGE_DIR=$BASE/munge
MUNGE_SOCK=$MUNGE_DIR/munge.socket
LOG=$BASE/log
RUN=$BASE/run
# Every daemon carries this in its environment; the stop script kills only such processes.
MARKER="HPCSERVE_SLURM_LOCAL_DIR=$BASE"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T0=$(date +%s.%N)
export PATH=$PATH:/usr/sbin:/sbin

log() { printf '[start-local-slurm %s] %s\n' "$(date +%T)" "$*" >&2; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
STARTED=0   # once daemons are being started, a failure stops them again
die() {
  log "ERROR: $*"
  if [ "$STARTED" = 1 ]; then
    log "stopping what was started (logs kept in $LOG)"
    SLURM_LOCAL_DIR=$BASE bash "$HERE/stop-local-slurm.sh" >&2 || true
  fi
  exit 1
}

[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_NODES must be a positive integer, not '$NODES'"
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_CPUS must be a positive integer, not '$CPUS'"
[[ "$PORT_BASE" =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_PORT_BASE must be a port number"
[[ "$BASE" = /* ]] || die "SLURM_LOCAL_DIR must be an absolute path, not '$BASE'"
SLURMD_PORTN=$((SLURMD_PORT0 + NODES - 1))
NODELIST="node[1-$NODES]"; PORTS="$SLURMD_PORT0-$SLURMD_PORTN"
[ "$NODES" = 1 ] && { NODELIST=node1; PORTS=$SLURMD_PORT0; }

# ------------------------------------------------------------------ health helpers
pid_ok() {  # pid_ok PIDFILE: the pid in it is alive (not a zombie) and carries our marker
  local pid
  pid=$(tr -dc '0-9' < "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
  { tr '\0' '\n' < "/proc/$pid/environ"; } 2>/dev/null | grep -qxF "$MARKER"
}
port_free() { ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
wait_for() {  # wait_for SECONDS CMD...
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.2
  done
}
slurm() { SLURM_CONF=$CONF timeout 15 "$@"; }
all_idle() { [ "$(slurm sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2=="idle"' | sort -u | wc -l)" -ge "$NODES" ]; }
munge_ok() { munge -S "$MUNGE_SOCK" -n 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; }
dbd_ok() { ! port_free "$DBD_PORT" && slurm sacctmgr -n list cluster >/dev/null 2>&1; }
SETTINGS="nodes=$NODES cpus=$CPUS mem=$MEM acct=$ACCT ports=$PORT_BASE extra=$(printf '%s' "$EXTRA_CONF" | cksum | cut -d' ' -f1) version=2"
cluster_healthy() {
  [ -f "$BASE/settings" ] && [ "$(cat "$BASE/settings")" = "$SETTINGS" ] || return 1
  local pf i bad
  for pf in "$RUN/munged.pid" "$RUN/slurmctld.pid"; do pid_ok "$pf" || return 1; done
  for i in $(seq 1 "$NODES"); do pid_ok "$RUN/slurmd-node$i.pid" || return 1; done
  if [ "$ACCT" = 1 ]; then pid_ok "$RUN/mariadbd.pid" && pid_ok "$RUN/slurmdbd.pid" || return 1; fi
  command -v sinfo >/dev/null 2>&1 && slurm sinfo -h >/dev/null 2>&1 || return 1
  # every node usable: none down, drained or not responding
  bad=$(slurm sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 !~ /^(idle|mixed|allocated|completing)$/' | wc -l)
  [ "$bad" = 0 ]
}
print_env() { echo "export SLURM_CONF=$CONF"; }

if [ "$CHECK_ONLY" = 1 ]; then
  if cluster_healthy; then log "cluster in $BASE is running"; print_env; exit 0; fi
  log "no healthy cluster with these settings in $BASE"; exit 1
fi
if cluster_healthy; then
  log "cluster in $BASE already running and healthy; reusing it"
  print_env
  exit 0
fi

# ------------------------------------------------------------------ 1. packages
need_bins=(slurmctld slurmd sbatch squeue scancel sinfo munged munge ss)
pkgs=(slurmctld slurmd slurm-client munge iproute2)
if [ "$ACCT" = 1 ]; then
  need_bins+=(slurmdbd sacct sacctmgr mariadbd mariadb-install-db mariadb-admin)
  pkgs+=(slurmdbd mariadb-server mariadb-client)
fi
missing=()
for b in "${need_bins[@]}"; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$INSTALL" = 1 ] || die "missing ${missing[*]}; install: apt-get install ${pkgs[*]} (or set SLURM_LOCAL_INSTALL=1)"
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; as root run: apt-get install ${pkgs[*]}"
  log "installing ${pkgs[*]} with apt-get (missing: ${missing[*]})"
  # Keep the packages' init scripts from starting system-wide munge/slurm/mariadb daemons.
  added_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; added_policy=1
  fi
  ok=0
  for attempt in 1 2 3; do
    if apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
         -o DPkg::Lock::Timeout=300 --no-install-recommends "${pkgs[@]}" >&2; then ok=1; break; fi
    log "apt-get failed (attempt $attempt), retrying"; sleep 5
  done
  [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$ok" = 1 ] || die "apt-get install ${pkgs[*]} failed"
  log "packages installed after $(elapsed)s"
fi
log "$(slurmctld -V)"

# ------------------------------------------------------------------ 2. clean up an old cluster
if [ -d "$BASE" ] && [ -n "$(ls -A "$BASE")" ] && [ ! -e "$BASE/.hpcserve-slurm-cluster" ]; then
  die "$BASE exists, is not empty and was not made by this script; set SLURM_LOCAL_DIR to another path"
fi
if [ -d "$BASE" ]; then
  log "stopping and wiping the previous cluster in $BASE"
  SLURM_LOCAL_DIR=$BASE bash "$HERE/stop-local-slurm.sh" --purge >&2 || true
fi
ports=("$CTLD_PORT" $(seq "$SLURMD_PORT0" "$SLURMD_PORTN"))
[ "$ACCT" = 1 ] && ports+=("$DBD_PORT" "$DB_PORT")
for p in "${ports[@]}"; do
  port_free "$p" || die "TCP port $p is already in use; set SLURM_LOCAL_PORT_BASE to another value"
done
mkdir -p "$ETC" "$LOG" "$RUN" "$BASE/state" "$MUNGE_DIR" "$BASE/munge-key"
touch "$BASE/.hpcserve-slurm-cluster"
for i in $(seq 1 "$NODES"); do mkdir -p "$BASE/spool/node$i"; done
chmod 755 "$BASE" "$MUNGE_DIR"          # munged insists its socket dir is world-executable
chmod 700 "$BASE/munge-key"

start_daemon() {  # start_daemon NAME CMD... : foreground daemon, detached in its own session
  local name=$1; shift
  env "$MARKER" SLURM_CONF="$CONF" setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
}

# ------------------------------------------------------------------ 3. munge
STARTED=1
trap 'die "unexpected failure (line $LINENO)"' ERR
dd if=/dev/urandom of="$BASE/munge-key/munge.key" bs=1 count=1024 status=none
chmod 400 "$BASE/munge-key/munge.key"
env "$MARKER" munged --socket="$MUNGE_SOCK" --key-file="$BASE/munge-key/munge.key" \
  --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" --seed-file="$BASE/munge-key/munged.seed" \
  --num-threads=4 </dev/null >>"$LOG/munged.out" 2>&1 || die "munged failed: $(tail -3 "$LOG/munged.log" 2>/dev/null)"
wait_for 10 munge_ok || die "munged is not answering (see $LOG/munged.log)"
log "munged up ($(elapsed)s)"

# ------------------------------------------------------------------ 4. slurm.conf
# Bind every daemon to 127.0.0.1 only - unless the machine's hostname does not resolve to
# 127.x, where Slurm would fail to bind; then listen on all interfaces (every connection
# still goes to 127.0.0.1 through SlurmctldHost=localhost and NodeAddr=127.0.0.1).
COMM="CommunicationParameters=NoInAddrAny,NoCtldInAddrAny"
if ! getent ahostsv4 "$(hostname)" 2>/dev/null | awk '{print $1; exit}' | grep -q '^127\.'; then
  COMM="# NoInAddrAny is off: hostname '$(hostname)' does not resolve to 127.x"
  log "note: hostname '$(hostname)' does not resolve to 127.x; daemons listen on all interfaces"
fi
ACCT_CONF="AccountingStorageType=accounting_storage/none"
if [ "$ACCT" = 1 ]; then
  # AccountingStoragePass = our private munge socket: how slurmctld/sacct reach slurmdbd.
  ACCT_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK"
fi
cat > "$CONF" <<EOF
# generated by hpcserve slurm/start-local-slurm.sh ($SETTINGS)
ClusterName=hpcserve
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
CredType=cred/munge
$COMM
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups here: track job processes through /proc, no CPU binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
# cores are the consumable; memory is not, so several jobs and steps share a node
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SlurmdParameters=config_overrides
$ACCT_CONF
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
# time limits: no grace period, SIGTERM -> SIGKILL after 5 s
OverTimeLimit=0
KillWait=5
# finished jobs stay visible in squeue (-t all) for 5 minutes
MinJobAge=300
Waittime=0
NodeName=$NODELIST NodeHostname=localhost NodeAddr=127.0.0.1 Port=$PORTS CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
if [ -n "$EXTRA_CONF" ]; then printf '# SLURM_LOCAL_EXTRA_CONF\n%s\n' "$EXTRA_CONF" >> "$CONF"; fi

# ------------------------------------------------------------------ 5. accounting
if [ "$ACCT" = 1 ]; then
  DB=$BASE/mariadb
  mkdir -p "$DB"
  mariadb-install-db --no-defaults --datadir="$DB/data" --user=root --auth-root-authentication-method=normal \
    --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
  start_daemon mariadbd mariadbd --no-defaults --datadir="$DB/data" --socket="$DB/mysqld.sock" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --user=root --pid-file="$RUN/mariadbd.pid" \
    --log-error="$LOG/mariadbd.log" --skip-name-resolve --skip-log-bin --performance-schema=OFF \
    --innodb-buffer-pool-size=16M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
    --aria-pagecache-buffer-size=2M --key-buffer-size=1M --max-connections=50 --table-open-cache=400
  wait_for 30 mariadb-admin --no-defaults -S "$DB/mysqld.sock" -uroot ping \
    || die "MariaDB did not start (see $LOG/mariadbd.log)"
  mariadb --no-defaults -S "$DB/mysqld.sock" -uroot -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    FLUSH PRIVILEGES;" || die "MariaDB setup failed"
  log "mariadb up ($(elapsed)s)"
  cat > "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ETC/slurmdbd.conf"   # slurmdbd refuses a world-readable config
  start_daemon slurmdbd slurmdbd -D
  wait_for 30 dbd_ok || die "slurmdbd did not come up (see $LOG/slurmdbd.log)"
  log "slurmdbd up ($(elapsed)s)"
fi

# ------------------------------------------------------------------ 6. slurmctld + nodes
start_daemon slurmctld slurmctld -D -i -f "$CONF"
for i in $(seq 1 "$NODES"); do
  start_daemon "slurmd-node$i" slurmd -D -N "node$i" -f "$CONF"
done
if ! wait_for "$TIMEOUT" all_idle; then
  slurm sinfo -N -l >&2 || true
  tail -n 20 "$LOG/slurmctld.log" "$LOG/slurmd-node1.log" >&2 || true
  die "nodes did not become idle within ${TIMEOUT}s"
fi
if [ "$ACCT" = 1 ]; then
  # slurmctld normally registers the cluster itself; make sure
  slurm sacctmgr -n list cluster format=cluster 2>/dev/null | grep -qw hpcserve \
    || slurm sacctmgr -i add cluster hpcserve >/dev/null 2>&1 || true
fi
trap - ERR
echo "$SETTINGS" > "$BASE/settings"
print_env > "$BASE/env.sh"
log "cluster up in $(elapsed)s: $(slurm sinfo -h -o '%P %a %D %T %N' | tr '\n' ' ')"
print_env
