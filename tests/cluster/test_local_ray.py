"""The local two-node Ray (tests/ray/start-local-ray.sh) is a real cluster: two alive nodes at 127.0.0.1,
tasks land on the node their custom resource names, a placement group spreads over both nodes, the
dashboard takes jobs, and node2 can be stopped and started again while the head keeps running."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.cluster.ray_fixture import placement_groups
from tests.conftest import wait_until

pytestmark = pytest.mark.slow


def alive_nodes(address: str) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=address, detail=True, raise_on_missing_output=False) if n.state == "ALIVE"]


def run_driver(local_ray, code: str) -> dict:
    """Run `code` as a Ray driver connected to the cluster; it prints one JSON object last."""
    prelude = f"import json, ray\nray.init(address={local_ray.gcs_address!r}, log_to_driver=False)\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True, text=True, env=local_ray.env, timeout=120,
    )
    assert done.returncode == 0, f"driver failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_alive_nodes_on_loopback(local_ray):
    nodes = alive_nodes(local_ray.address)
    assert len(nodes) == 2
    assert {n.node_ip for n in nodes} == {"127.0.0.1"}
    by_resource = {name: n.node_id for n in nodes for name in ("node1", "node2") if n.resources_total.get(name)}
    assert by_resource == local_ray.node_ids()
    assert all(n.resources_total["CPU"] == 1 for n in nodes)


def test_tasks_run_on_the_node_their_resource_names_and_a_placement_group_spreads(local_ray):
    seen = run_driver(
        local_ray,
        """
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        @ray.remote(num_cpus=0)
        def node_id():
            return ray.get_runtime_context().get_node_id()

        pinned = {name: ray.get(node_id.options(resources={name: 1}).remote()) for name in ("node1", "node2")}
        # One CPU bundle per node: the shape of a 2-worker job (Ray Train's default PACK still spreads
        # here, as each node has one CPU); STRICT_SPREAD fails rather than doubling up.
        group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
        ray.get(group.ready(), timeout=30)
        bundles = [
            ray.get(node_id.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, bundle)).remote())
            for bundle in (0, 1)
        ]
        remove_placement_group(group)
        print(json.dumps({"pinned": pinned, "bundles": bundles, "group": group.id.hex()}))
        """,
    )
    assert seen["pinned"] == local_ray.node_ids()
    assert seen["pinned"]["node1"] != seen["pinned"]["node2"]
    assert sorted(seen["bundles"]) == sorted(seen["pinned"].values())
    states = {g.placement_group_id: g.state for g in placement_groups(local_ray.address)}
    assert states[seen["group"]] == "REMOVED"
    assert not [s for s in states.values() if s != "REMOVED"]


def test_dashboard_runs_a_submitted_job(local_ray):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(local_ray.address)
    job_id = client.submit_job(entrypoint="python -c 'print(42)'")
    wait_until(lambda: client.get_job_status(job_id).is_terminal(), 60, f"job {job_id} to end")
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    assert "42" in client.get_job_logs(job_id).split()


def test_node2_stops_alone_and_comes_back(local_ray):
    head_id = local_ray.node_ids()["node1"]
    local_ray.stop_node2()
    wait_until(lambda: len(alive_nodes(local_ray.address)) == 1, 30, "node2 to leave the cluster")
    assert [n.node_id for n in alive_nodes(local_ray.address)] == [head_id]

    node2_id = local_ray.start_node2()
    wait_until(lambda: len(alive_nodes(local_ray.address)) == 2, 30, "node2 to rejoin")
    assert local_ray.node_ids() == {"node1": head_id, "node2": node2_id}
    on_node2 = run_driver(
        local_ray,
        """
        @ray.remote(num_cpus=0, resources={"node2": 1})
        def node_id():
            return ray.get_runtime_context().get_node_id()

        print(json.dumps(ray.get(node_id.remote())))
        """,
    )
    assert on_node2 == node2_id
