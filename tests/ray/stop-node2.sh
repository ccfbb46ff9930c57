#!/usr/bin/env bash
# Stop only the local Ray's second node: its raylet, agents and workers (its process group, see
# ray-nodes.sh); the head and its workers keep running. The GCS marks the node DEAD at once (the node
# drains on SIGTERM). Idempotent; start-node2.sh brings it back.
set -euo pipefail
SCRIPT=stop-node2
. "$(dirname "${BASH_SOURCE[0]}")/ray-nodes.sh"

read_nodes_env
stop_node_group "$NODE2_PID"
NODE2_PID='' NODE2_ID=''
[ -f "$NODES_ENV" ] && write_nodes_env
echo "$SCRIPT: stopped"
