"""What each strategy is, and which method x strategy x device combinations run: one table, read by the
planner (it never chooses a refused combination), the pre-launch checks, model building and the loop.

Pure: no torch import, so `ftl plan` and the planner tests read it without loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEVICES = ("cpu", "cuda")
METHODS = ("full", "lora", "qlora", "prompt_tuning", "freeze", "gradual_unfreezing")
# Saved and exported as adapters (only what trains goes into a checkpoint), not whole models.
PEFT_METHODS = ("lora", "qlora", "prompt_tuning")


@dataclass(frozen=True)
class StrategyTraits:
    name: str
    library: Literal["torch", "deepspeed"]  # also the checkpoint format: DCP for torch, DeepSpeed's own
    sharding_level: int  # 0 replicated .. 3 fully sharded, 4 sharded and offloaded; bigger jobs never get less
    zero_stage: int = 0  # DeepSpeed's stage (0: not DeepSpeed)
    offload: bool = False  # model states live in host memory
    meta_init: bool = False  # the loop builds the model on meta and the strategy materialises it per shard
    dtensor_params: bool = False  # parameters become DTensor shards (FSDP2): 4-bit storage must be a float dtype
    grads_in_param: bool = True  # gradients land in `param.grad` (ZeRO keeps them in its own partitions)
    trainable_set_can_grow: bool = False  # params may be unfrozen after wrapping (gradual unfreezing)

    @property
    def checkpoint_format(self) -> str:
        return "dcp" if self.library == "torch" else "deepspeed"


STRATEGIES: dict[str, StrategyTraits] = {
    t.name: t
    for t in (
        # DDP's reducer is rebuilt when parameters are unfrozen (strategies/ddp.py); the others fix the
        # trained set when they wrap (FSDP2's flat groups, ZeRO's partitions).
        StrategyTraits("ddp", "torch", 0, trainable_set_can_grow=True),
        StrategyTraits("zero1", "deepspeed", 1, zero_stage=1, grads_in_param=False),
        StrategyTraits("zero2", "deepspeed", 2, zero_stage=2, grads_in_param=False),
        StrategyTraits("fsdp2", "torch", 3, meta_init=True, dtensor_params=True),
        StrategyTraits("zero3", "deepspeed", 3, zero_stage=3, grads_in_param=False),
        StrategyTraits("fsdp2_offload", "torch", 4, offload=True, meta_init=True, dtensor_params=True),
        StrategyTraits("zero3_offload", "deepspeed", 4, zero_stage=3, offload=True, grads_in_param=False),
    )
}
# The planner's order when `strategy: auto`: least communication first. Of the two offloading ones,
# DeepSpeed's steps the optimizer with its CPU Adam kernel; FSDP2's is there for what ZeRO-3 refuses (QLoRA).
AUTO_ORDER = ("ddp", "zero1", "zero2", "fsdp2", "zero3_offload", "fsdp2_offload")


def traits(strategy: str) -> StrategyTraits:
    return STRATEGIES[strategy]


def refusal(method: str, strategy: str, device: str) -> str:
    """Why `method` cannot run with `strategy` on `device`, as a sentence to put in an error; '' if it runs.
    Every '' here is exercised by a real run in tests (tests/test_methods.py, tests/strategies/)."""
    t = STRATEGIES[strategy]
    if method == "gradual_unfreezing" and not t.trainable_set_can_grow:
        return (
            f"gradual unfreezing adds trained parameters during the run, and {strategy} fixes the trained set when it "
            "wraps the model (only ddp rebuilds its gradient sync)"
        )
    if method == "qlora" and t.zero_stage == 3:
        return (
            f"{strategy} (ZeRO-3) partitions parameters by flattening them, which breaks QLoRA's packed 4-bit weights "
            "and their quantisation state"
        )
    return ""


def runnable(method: str, device: str) -> tuple[str, ...]:
    """The strategies `method` runs with on `device`, in the planner's order then the rest."""
    order = [*AUTO_ORDER, *(s for s in STRATEGIES if s not in AUTO_ORDER)]
    return tuple(s for s in order if not refusal(method, s, device))
