"""The real two-node Ray for every Ray test of this package, started once (tests/cluster/ray_fixture.py)."""

from tests.cluster.ray_fixture import local_ray  # noqa: F401 (a fixture, registered here)
