#!/usr/bin/env bash
# Start the local Ray's second node again (after stop-node2.sh), with the same ports and resource node2;
# a no-op when it is up. Needs the head (start-local-ray.sh). Prints node2's new node id.
set -euo pipefail
SCRIPT=start-node2
. "$(dirname "${BASH_SOURCE[0]}")/ray-nodes.sh"

check_ray_installed
read_nodes_env
head_up || die "the head is not up: run tests/ray/start-local-ray.sh."
ensure_node2
echo "$NODE2_ID"
