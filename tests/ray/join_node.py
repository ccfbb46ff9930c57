"""Join one more Ray node, at 127.0.0.1, to the local head: what `ray start --address ... --block` does,
without its rewrite of 127.0.0.1.

Why not `ray start` itself (Ray 2.60): for a worker node, `ray start` replaces a loopback
`--node-ip-address` and a loopback `--address` by this host's external IP
(`ray._private.services.resolve_ip_for_localhost`), and every node whose IP is not loopback binds its
raylet, object manager, agent gRPC and metrics ports on all interfaces (`0.0.0.0`/`[::]`). The one switch that
keeps 127.0.0.1 (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, set for the head in ray-nodes.sh) also makes
`ray start` refuse to start a worker node. So this builds the same `RayParams` and `Node` that `ray start`
builds (ray/scripts/scripts.py), with node_ip_address 127.0.0.1 kept as given: a real raylet with its own
agents and workers, registered with the head's GCS like any other node.

The flags are `ray start`'s own names (ray-nodes.sh renders them once for both commands). Blocks until
SIGTERM, which stops the node's processes and tells the GCS the node is gone (Ray's own handler, installed
by `Node(shutdown_at_exit=True)`); a reaper process stops them if this process is killed outright.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the head's GCS, host:port")
    parser.add_argument("--node-ip-address", default="127.0.0.1")
    parser.add_argument("--temp-dir", required=True)
    parser.add_argument("--num-cpus", type=int, default=1)
    parser.add_argument("--num-gpus", type=int, default=0)
    parser.add_argument("--object-store-memory", type=int, required=True)
    parser.add_argument("--resources", type=json.loads, default={})
    for port in (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
        "min-worker-port",
        "max-worker-port",
    ):
        parser.add_argument(f"--{port}", type=int, required=True)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(
        gcs_address=args.address,
        node_ip_address=args.node_ip_address,
        node_name=args.node_ip_address,  # as `ray start` names a node
        temp_dir=args.temp_dir,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        object_store_memory=args.object_store_memory,
        resources=args.resources,
        node_manager_port=args.node_manager_port,
        object_manager_port=args.object_manager_port,
        dashboard_agent_listen_port=args.dashboard_agent_listen_port,
        metrics_agent_port=args.dashboard_agent_grpc_port,
        metrics_export_port=args.metrics_export_port,
        runtime_env_agent_port=args.runtime_env_agent_port,
        min_worker_port=args.min_worker_port,
        max_worker_port=args.max_worker_port,
        # The head's log monitor already tails the session's log dir, which both nodes share; a second
        # one would forward every worker line twice (ray.cluster_utils.Cluster.add_node does the same).
        include_log_monitor=False,
    )
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"join_node: node {node.node_id} at {node.node_ip_address} joined {args.address}", flush=True)
    # As `ray start --block`: a node whose raylet or agent died is stopped whole, not left half alive.
    while True:
        time.sleep(1)
        dead = [(name, proc.returncode) for name, proc in node.dead_processes()]
        if dead:
            print(f"join_node: node processes exited: {dead}; stopping the node", file=sys.stderr, flush=True)
            node.kill_all_processes(check_alive=False, allow_graceful=False)
            return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
