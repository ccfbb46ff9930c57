"""The strategy implementations by name. Explicit: tests/strategies/test_registry.py checks it against
strategies.catalog (every strategy the planner may choose has an implementation)."""

from __future__ import annotations

import importlib.util

from strategies.base import Strategy
from strategies.catalog import traits
from strategies.ddp import DDPStrategy
from strategies.deepspeed import DeepSpeedStrategy
from strategies.errors import FTLError
from strategies.fsdp2 import FSDP2OffloadStrategy, FSDP2Strategy

REGISTRY: dict[str, type[Strategy]] = {
    "ddp": DDPStrategy,
    "fsdp2": FSDP2Strategy,
    "fsdp2_offload": FSDP2OffloadStrategy,
    # One DeepSpeed file serves every ZeRO variant: the stage and offload come from the catalog.
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


def check_available(name: str) -> None:
    """Fail before launch, with the fix, when a strategy's library is missing here."""
    if traits(name).library == "deepspeed" and not _importable("deepspeed"):
        raise FTLError(
            f"Strategy {name} runs on DeepSpeed, which is not installed. Install it with "
            "`pip install -c constraints.txt '.[deepspeed]'`, or use `strategy=fsdp2` (native PyTorch sharding)."
        )
    if traits(name).dtensor_params:
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            raise FTLError(
                f"Strategy {name} needs FSDP2 (`torch.distributed.fsdp.fully_shard`, torch >= 2.6); this torch lacks "
                "it. Install torch==2.13.0 (see constraints.txt) or use `strategy=ddp`."
            ) from None


def check_pinned_memory(name: str, device_type: str) -> None:
    """Offloading strategies on CUDA stage states in pinned (page-locked) host memory; containers and
    hosts with a low memlock limit refuse it, which otherwise surfaces as an opaque CUDA error mid-setup."""
    if not traits(name).offload or device_type != "cuda":
        return
    import torch

    try:
        torch.empty(2**20, dtype=torch.uint8, pin_memory=True)
    except RuntimeError as exc:
        raise FTLError(
            f"Strategy {name} offloads to pinned CPU memory, which this machine refused ({str(exc).splitlines()[0]}). "
            "Raise the locked-memory limit (`ulimit -l unlimited`; in Docker `--ulimit memlock=-1`), or use a "
            "strategy without offload (`strategy=fsdp2` or `zero3`) with more GPUs."
        ) from None


def _importable(module: str) -> bool:
    """Without importing it (DeepSpeed's import is slow and chatty)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False
