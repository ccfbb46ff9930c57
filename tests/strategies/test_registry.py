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
