#!/usr/bin/env bash
# Start a real two-node Slurm on this one machine, for FTL's tests: slurmctld plus `slurmd -N node1` and
# `slurmd -N node2`, both reached at 127.0.0.1, sharing this host's cores (OverSubscribe=FORCE).
#
# Idempotent: with the cluster up (daemons alive, config unchanged, nodes usable) it returns at once.
# No systemd: the daemons are started directly. Needs root on Debian; installs slurmctld, slurmd,
# slurm-client and munge with apt-get when they are missing.
#
# Everything Slurm writes (state, spool, logs, pid files, the job-completion file) lives under
# FTL_SLURM_DIR (default /tmp/ftl-slurm). The config is written there and copied to /etc/slurm/slurm.conf
# (unless that file belongs to some other Slurm) so plain `sbatch` works without SLURM_CONF.
#
# Env: FTL_SLURM_DIR, FTL_SLURM_TIMEOUT_S (wait for idle nodes, default 60).
set -euo pipefail

DIR=${FTL_SLURM_DIR:-/tmp/ftl-slurm}
TIMEOUT_S=${FTL_SLURM_TIMEOUT_S:-60}
CONF=$DIR/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
MARK="# Written by FTL tests/slurm/start-local-slurm.sh"
NODES="node[1-2]"
export PATH="$PATH:/usr/sbin:/sbin"

die() { echo "start-local-slurm: $*" >&2; exit 1; }
log() { echo "start-local-slurm: $*" >&2; }

[ "$(id -u)" -eq 0 ] || die "needs root (it installs packages, runs munged and the Slurm daemons as root)."

install_packages() {
    local missing=0 b
    for b in slurmctld slurmd sinfo sbatch munged munge; do
        command -v "$b" >/dev/null || missing=1
    done
    [ "$missing" -eq 1 ] || return 0
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it."
    log "installing slurmctld slurmd slurm-client munge with apt-get"
    local t0=$SECONDS made_policy=0
    # Keep the packages' maintainer scripts from starting daemons: this script starts its own.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    local apt=(apt-get -y -q -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=300 --no-install-recommends)
    local pkgs=(slurmctld slurmd slurm-client munge)
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${pkgs[@]}" >"/tmp/ftl-slurm-apt.log" 2>&1; then
        # Most often the package lists are missing or stale: refresh once and retry.
        DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update >>"/tmp/ftl-slurm-apt.log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${pkgs[@]}" >>"/tmp/ftl-slurm-apt.log" 2>&1 || {
            [ "$made_policy" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
            tail -n 20 /tmp/ftl-slurm-apt.log >&2
            die "apt-get install failed (full log: /tmp/ftl-slurm-apt.log)."
        }
    fi
    [ "$made_policy" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
    log "installed in $((SECONDS - t0)) s"
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        install -d -m 700 /etc/munge
        head -c 1024 /dev/urandom >/etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    install -d -m 755 /run/munge  # munged refuses a socket directory that others cannot traverse
    install -d /var/lib/munge
    munge_works && return 0
    # --force: munged declines to run as root without it. Its log goes to our root-owned dir: the
    # package's /var/log/munge belongs to the munge user, which munged (as root) warns about.
    munged --force --log-file="$DIR/log/munged.log" || die "munged did not start (see $DIR/log/munged.log)."
    : >"$DIR/run/munged.ftl"  # tells stop-local-slurm.sh that munged is ours to stop
    local i
    for i in $(seq 20); do munge_works && return 0; sleep 0.5; done
    die "munged started but munge -n | unmunge fails (see $DIR/log/munged.log)."
}

# RealMemory below what this host has, or slurmd's registration drains the node ("Low RealMemory").
real_memory_mb() {
    local total_mb
    total_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    echo $(( total_mb > 2048 ? 1024 : total_mb / 2 ))
}

render_conf() {
    local host=$1
    cat <<EOF
$MARK ($DIR). Two slurmd on one host.
ClusterName=ftl-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s); 10 s keeps tests short.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Node hardware may differ from the lines below (two slurmd share this host): trust the config, do not drain.
SlurmdParameters=config_overrides
ReturnToService=2
# Without slurmdbd: keep finished jobs in scontrol for an hour, and list them with sacct -c.
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/state/jobcomp.txt
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
NodeName=$NODES NodeHostname=$host NodeAddr=127.0.0.1 CPUs=2 RealMemory=$(real_memory_mb) Port=[17001-17002] State=UNKNOWN
PartitionName=debug Nodes=$NODES Default=YES OverSubscribe=FORCE MaxTime=INFINITE State=UP
EOF
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
daemons_alive() {
    alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd-node1.pid" && alive "$DIR/run/slurmd-node2.pid"
}

# node1 idle, node2 mix, ... ; "down*"/"drain" etc. are not usable
node_states() { sinfo -h -N -o '%N %t' 2>/dev/null | sort -u; }
nodes_usable() {
    local states
    states=$(node_states)
    [ "$(grep -cE '^node[12] (idle|mix|alloc|comp)$' <<<"$states")" -eq 2 ]
}

stop_daemons() {
    local f pid
    for f in "$DIR"/run/slurmd-node1.pid "$DIR"/run/slurmd-node2.pid "$DIR"/run/slurmctld.pid; do
        alive "$f" || continue
        pid=$(cat "$f")
        kill "$pid"
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    done
    return 0
}

show_logs_and_die() {
    local f
    for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd-node1.log "$DIR"/log/slurmd-node2.log; do
        [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 15 "$f" >&2; }
    done
    echo "--- sinfo" >&2
    sinfo -N -l >&2 || true
    die "$1"
}

print_env() {
    echo "export SLURM_CONF=$CONF   # or nothing: $SYSTEM_CONF holds the same config"
}

t0=$SECONDS
install_packages
mkdir -p "$DIR"/state "$DIR"/spool/node1 "$DIR"/spool/node2 "$DIR"/log "$DIR"/run
chmod 755 "$DIR"
export SLURM_CONF=$CONF  # the daemons, and the jobs they start, read this config
HOST=$(hostname -s)
NEW_CONF=$(render_conf "$HOST")

if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$NEW_CONF" ] && daemons_alive && munge_works && nodes_usable; then
    print_env
    exit 0
fi

start_munge
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
    [ -f "$CONF" ] && { log "config changed: restarting the daemons"; stop_daemons; }
    printf '%s\n' "$NEW_CONF" >"$CONF"
fi
mkdir -p /etc/slurm
if [ ! -e "$SYSTEM_CONF" ] || head -n1 "$SYSTEM_CONF" | grep -qF "$MARK"; then
    cp "$CONF" "$SYSTEM_CONF"
else
    log "$SYSTEM_CONF belongs to another Slurm: left alone; clients need SLURM_CONF=$CONF"
fi

# -i: start even if a state file from an earlier run is damaged (a killed VM, a full /tmp).
alive "$DIR/run/slurmctld.pid" || slurmctld -i -f "$CONF" || show_logs_and_die "slurmctld did not start."
for n in node1 node2; do
    alive "$DIR/run/slurmd-$n.pid" || slurmd -f "$CONF" -N "$n" || show_logs_and_die "slurmd -N $n did not start."
done

# Nodes come back down/drained after a restart (or a slurmd that was killed): resume them.
deadline=$((SECONDS + TIMEOUT_S))
next_resume=$SECONDS
until nodes_usable; do
    [ "$SECONDS" -lt "$deadline" ] || show_logs_and_die "nodes not idle after ${TIMEOUT_S} s: $(node_states | tr '\n' ' ')"
    if [ "$SECONDS" -ge "$next_resume" ] && node_states | grep -qE ' (down|drain|drng|fail)'; then
        scontrol update nodename="$NODES" state=resume 2>/dev/null || true
        next_resume=$((SECONDS + 3))
    fi
    sleep 1
done
log "cluster up in $((SECONDS - t0)) s: $(node_states | tr '\n' ' ')"
print_env
