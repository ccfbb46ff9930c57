"""A real two-node Ray on this machine, for tests (tests/ray/start-local-ray.sh): a head with resource
`node1` and a second node with resource `node2`, both at 127.0.0.1 with 1 CPU each, every port on loopback.

tests/cluster/conftest.py registers the fixture for the tests/cluster package: the cluster starts once (idempotent:
instant when it is up) for every Ray test there and stops when the package is done, and
skips only where Ray is not installed; any other failure to start fails the test with the script's output.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = REPO / "tests/ray"
RAY_NOT_INSTALLED = 3  # start-local-ray.sh's exit code when it finds no importable Ray


@dataclass(frozen=True)
class LocalRay:
    address: str
    """The dashboard, http://127.0.0.1:8265: RAY_ADDRESS for `ftl submit` and job submission."""
    gcs_address: str
    """127.0.0.1:6390, for `ray.init(address=...)` in a driver started with `env`."""
    env: dict[str, str] = field(repr=False)
    """What a subprocess (`ftl submit`, a Ray driver) needs: os.environ plus RAY_ADDRESS and Ray's settings."""
    tmp_dir: Path
    """Where the nodes' output, Ray's session logs and nodes.env live."""

    def node_ids(self) -> dict[str, str]:
        """The Ray node ids of `node1` (the head) and `node2` ('' while node2 is stopped), from nodes.env."""
        recorded = dict(line.split("=", 1) for line in (self.tmp_dir / "nodes.env").read_text().split())
        return {"node1": recorded.get("HEAD_ID", ""), "node2": recorded.get("NODE2_ID", "")}

    def stop_node2(self) -> None:
        """Stop only the second node (its raylet, agents and workers); the GCS marks it dead at once."""
        _run_script("stop-node2.sh", self.env, timeout_s=60)

    def kill_node2(self) -> None:
        """Lose the second node at once: SIGKILL to every process of its session (raylet, agents, workers), as a
        machine that dies or a spot reclaim past its deadline. Returns once the GCS has marked it dead (its
        health checks take a few seconds): a node started on the same ports before that was seen to exit."""
        from ray.util.state import list_nodes

        recorded = dict(line.split("=", 1) for line in (self.tmp_dir / "nodes.env").read_text().split())
        # The whole session, not the process group: Ray starts each worker in a process group of its own
        # (seen here: an actor's pgid is its pid, its session the node's), so a group kill leaves the workers.
        # Nothing left (exit 1) is fine: a drained node's raylet exits by itself once it is idle.
        subprocess.run(["pkill", "-KILL", "--session", recorded["NODE2_PID"]], check=False)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            nodes = list_nodes(address=self.address, filters=[("node_id", "=", recorded["NODE2_ID"])], raise_on_missing_output=False)
            if all(node.state == "DEAD" for node in nodes):
                return
            time.sleep(1)
        raise AssertionError(f"node2 {recorded['NODE2_ID']} still not DEAD 90 s after SIGKILL")

    def start_node2(self) -> str:
        """Start the second node again (same ports, resource `node2`); return its new node id."""
        return _run_script("start-node2.sh", self.env, timeout_s=120).stdout.strip().splitlines()[-1]


def ray_env(address: str) -> dict[str, str]:
    return {
        **os.environ,
        "RAY_ADDRESS": address,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        # On Linux this only keeps Ray from rewriting 127.0.0.1 to the host's external IP, where this
        # cluster does not listen (see tests/ray/ray-nodes.sh).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


def _run_script(name: str, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", str(SCRIPTS / name)], capture_output=True, text=True, env=env, timeout=timeout_s)
    assert done.returncode == 0, f"tests/ray/{name} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="package")
def local_ray():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        ["bash", str(SCRIPTS / "start-local-ray.sh")], capture_output=True, text=True, env=env, timeout=180
    )
    if done.returncode == RAY_NOT_INSTALLED:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, f"tests/ray/start-local-ray.sh failed:\n{done.stdout}\n{done.stderr}"
    address = done.stdout.strip().splitlines()[-1]
    port = os.environ.get("FTL_RAY_PORT", "6390")
    tmp_dir = Path(os.environ.get("FTL_RAY_TMP", "/tmp/ftl-ray"))
    yield LocalRay(address=address, gcs_address=f"127.0.0.1:{port}", env=ray_env(address), tmp_dir=tmp_dir)
    _run_script("stop-local-ray.sh", env, timeout_s=120)


def placement_groups(address: str) -> list:
    """Every placement group the cluster at `address` (the dashboard URL) knows, as Ray's
    `PlacementGroupState` records (`.placement_group_id`, `.name`, `.state`). A removed group stays listed
    with state "REMOVED"; a test that nothing is left checks that no other state remains."""
    from ray.util.state import list_placement_groups

    return list_placement_groups(address=address, limit=10_000, raise_on_missing_output=False)
