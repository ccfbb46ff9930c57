#!/usr/bin/env bash
# Start a real two-node Ray on this one machine, for FTL's tests: a head (GCS, dashboard, a raylet with
# custom resource node1) and a second raylet (resource node2) joined to it, both at 127.0.0.1 and
# listening on loopback only, 1 CPU, no GPU and a 200 MiB object store each, so a 2-worker job puts one
# worker on each node. How the nodes are started and stopped, and the ports: ray-nodes.sh.
#
# Idempotent: with both nodes alive and the dashboard answering it only prints the address; with the head
# up but node2 gone it starts node2; otherwise it stops what it started before and starts both.
# The last line printed is the dashboard address (RAY_ADDRESS for `ray job submit` and `ftl submit`).
# Node pids and ids are recorded in $FTL_RAY_TMP/nodes.env; the nodes' output and Ray's logs are there too.
#
# Env: RAY_BIN (default $VENV/bin/ray, VENV default .venv), FTL_RAY_TMP (/tmp/ftl-ray), FTL_RAY_PORT (6390),
# FTL_RAY_DASHBOARD_PORT (8265), FTL_RAY_WORKER_PORT (11000), FTL_RAY_TIMEOUT_S (90, per node).
set -euo pipefail
SCRIPT=start-local-ray
. "$(dirname "${BASH_SOURCE[0]}")/ray-nodes.sh"

check_ray_installed
read_nodes_env
ensure_head
ensure_node2
echo "$DASHBOARD_URL"
