"""Every registered strategy is a strategy the planner can name, and provides the whole protocol."""

from launcher.spec import STRATEGIES
from strategies import REGISTRY, get_strategy
from launcher.errors import FTLError

import pytest


def test_registry_names_are_planner_names():
    assert set(REGISTRY) <= set(STRATEGIES)
    for name, cls in REGISTRY.items():
        assert getattr(cls, "name", name) == name  # DeepSpeed takes its name (zero1..3) from the plan
        for method in ("setup", "accumulate", "backward", "step", "save", "load"):
            assert callable(getattr(cls, method))


def test_unimplemented_strategy_is_a_clear_error():
    missing = sorted(set(STRATEGIES) - set(REGISTRY))
    if not missing:
        return
    with pytest.raises(FTLError, match="not implemented"):
        get_strategy(missing[0])


def test_missing_deepspeed_is_caught_before_launch(tmp_path):
    """A forced ZeRO strategy without DeepSpeed importable: one paragraph naming the install command."""
    import os
    import subprocess
    import sys

    from tests.conftest import FTL, REPO, tiny_spec, write_spec

    # A sitecustomize that makes `deepspeed` unimportable (a None entry in sys.modules), as on a
    # machine without it.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['deepspeed'] = None\n")
    spec = write_spec(tmp_path, tiny_spec(tmp_path, strategy="zero2"))
    env = {**os.environ, "PYTHONPATH": str(hide)}
    result = subprocess.run([FTL, "run", str(spec)], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "DeepSpeed, which is not installed" in result.stderr and ".[deepspeed]" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing launched, nothing written
