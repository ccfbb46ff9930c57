"""Every registered strategy is a strategy the planner can name, and provides the whole protocol."""

from launcher.spec import STRATEGIES
from launcher.errors import FTLError
from strategies.catalog import STRATEGIES as CATALOG
from strategies.registry import REGISTRY, get_strategy

import pytest


def test_registry_names_are_planner_names():
    assert set(REGISTRY) <= set(STRATEGIES) == set(CATALOG)
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


def test_strategies_do_not_import_launcher():
    """strategies/ sits below launcher/: a config of its own (strategies/config.py), no folder-level cycle."""
    import ast
    from pathlib import Path

    from tests.conftest import REPO

    for path in sorted((REPO / "strategies").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.split(".")[0] in ("launcher", "cluster")], path


def test_every_strategy_the_catalog_names_is_implemented():
    assert set(REGISTRY) == set(CATALOG)
