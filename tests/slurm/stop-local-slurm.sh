#!/usr/bin/env bash
# Stop the local Slurm that start-local-slurm.sh started: cancel every job, wait for the jobs' processes to
# end, stop slurmd x2 and slurmctld, and munged if that script started it. Idempotent; keeps the state dir
# (remove FTL_SLURM_DIR by hand for a clean slate).
set -uo pipefail

DIR=${FTL_SLURM_DIR:-/tmp/ftl-slurm}
export PATH="$PATH:/usr/sbin:/sbin"
export SLURM_CONF=$DIR/slurm.conf

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pid_file() {
    local f=$1 pid
    alive "$f" || return 0
    pid=$(cat "$f")
    kill "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null
    return 0
}

if alive "$DIR/run/slurmctld.pid"; then
    # slurmstepd outlives slurmd, so end the jobs first, while the daemons can still deliver the kill.
    scancel --partition=debug 2>/dev/null
    for _ in $(seq 30); do
        [ -z "$(squeue -h -t RUNNING,COMPLETING,SUSPENDED -o %i 2>/dev/null)" ] && break
        sleep 1
    done
fi
stop_pid_file "$DIR/run/slurmd-node1.pid"
stop_pid_file "$DIR/run/slurmd-node2.pid"
stop_pid_file "$DIR/run/slurmctld.pid"

if [ -f "$DIR/run/munged.ftl" ]; then
    stop_pid_file /run/munge/munged.pid
    rm -f "$DIR/run/munged.ftl"
fi
echo "stop-local-slurm: stopped"
