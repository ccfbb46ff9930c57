"""Parallel strategies: one small file each, behind the `Strategy` protocol in strategies/base.py."""

from __future__ import annotations

from launcher.errors import FTLError
from strategies.base import Strategy
from strategies.ddp import DDPStrategy

# Explicit registry, checked by tests/strategies/test_registry.py against the planner's strategy names.
REGISTRY: dict[str, type[Strategy]] = {
    "ddp": DDPStrategy,
}


def get_strategy(name: str) -> type[Strategy]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise FTLError(
            f"Strategy {name!r} is planned but not implemented in this version of FTL (available: "
            f"{', '.join(REGISTRY)}). Force one with `strategy=ddp` if the model fits, or wait for the "
            "FSDP2/DeepSpeed strategies."
        ) from None
