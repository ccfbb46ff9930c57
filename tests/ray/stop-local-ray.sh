#!/usr/bin/env bash
# Stop the local Ray that start-local-ray.sh started: node2's process group, then the head's (see
# ray-nodes.sh). Only the processes recorded in $FTL_RAY_TMP/nodes.env are signalled, so a Ray someone else
# runs on this host is left alone. Idempotent; keeps $FTL_RAY_TMP (logs) but forgets the nodes.
set -uo pipefail
SCRIPT=stop-local-ray
. "$(dirname "${BASH_SOURCE[0]}")/ray-nodes.sh"

read_nodes_env
STOP_GRACE_S=${STOP_GRACE_S:-8}
stop_node_group "$NODE2_PID"
stop_node_group "$HEAD_PID"
rm -f "$NODES_ENV"
echo "$SCRIPT: stopped"
