"""Parallel strategies: one small file each, behind the `Strategy` protocol in strategies/base.py."""

from __future__ import annotations

from launcher.errors import FTLError
from strategies.base import Strategy
from strategies.ddp import DDPStrategy
from strategies.deepspeed import DeepSpeedStrategy
from strategies.fsdp2 import FSDP2OffloadStrategy, FSDP2Strategy

# Explicit registry, checked by tests/strategies/test_registry.py against the planner's strategy names.
REGISTRY: dict[str, type[Strategy]] = {
    "ddp": DDPStrategy,
    "fsdp2": FSDP2Strategy,
    "fsdp2_offload": FSDP2OffloadStrategy,
    # One DeepSpeed file serves every ZeRO variant: the stage and offload come from the plan.
    "zero1": DeepSpeedStrategy,
    "zero2": DeepSpeedStrategy,
    "zero3": DeepSpeedStrategy,
    "zero3_offload": DeepSpeedStrategy,
}


def get_strategy(name: str) -> type[Strategy]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise FTLError(
            f"Strategy {name!r} is planned but not implemented in this version of FTL (available: "
            f"{', '.join(REGISTRY)}). Force one of those with `strategy=NAME`."
        ) from None
