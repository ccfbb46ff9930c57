"""The little a strategy needs to know about the job: a frozen config of its own, built by the launcher
from the plan and the spec (launcher/job.py), so that strategies/ never imports the user-facing spec or
the planner."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StrategyConfig:
    name: str  # a key of strategies.catalog.STRATEGIES
    device: str  # "cuda" | "cpu", as planned
    precision: str  # "bf16" | "fp32"
    world_size: int  # as planned; ranks pass the real one where it matters (DeepSpeed's batch size)
    shard_group: int  # ranks sharing one copy of the model states (HSDP: a node)
    trainable_only: bool  # checkpoints hold only what trains (PEFT adapters, prompts, new heads)
    micro_batch_size: int
    grad_accum: int
    max_grad_norm: float | None
