"""DeepSpeed ZeRO stage 1, 2, 3 and ZeRO-3 with optimizer and parameter offload to the CPU, through
`deepspeed.initialize` with the config rendered by strategies/deepspeed_config.py (also written to the
run dir as deepspeed.json). Checkpoints use DeepSpeed's own `save_checkpoint`/`load_checkpoint`."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from launcher.errors import FTLError
from launcher.planner import Plan
from launcher.spec import PEFT_METHODS, TrainSpec
from strategies.base import OptimizerFactory, RankContext
from strategies.deepspeed_config import deepspeed_config


def import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise FTLError(
            "The plan uses DeepSpeed (ZeRO), which is not installed. Install it with `pip install -c constraints.txt "
            ".[deepspeed]`, or force a native strategy: `strategy=fsdp2` (sharded) or `strategy=ddp`."
        ) from None
    return deepspeed


class DeepSpeedStrategy:
    meta_init = False

    def __init__(self, plan: Plan, ctx: RankContext, train: TrainSpec) -> None:
        self.plan = plan
        self.ctx = ctx
        self.name = plan.strategy
        self.config = deepspeed_config(plan, train, ctx.env.world_size)
        self.trainable_only = plan.request.method in PEFT_METHODS

    def setup(self, model: torch.nn.Module, build_optimizer: OptimizerFactory, weights: Path | None = None) -> None:
        deepspeed = import_deepspeed()
        optimizer = build_optimizer(model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.model = self.engine
        # The LR schedule drives the torch optimizer's param groups, which ZeRO's wrapper shares.
        self.optimizer = optimizer

    def accumulate(self, sync: bool) -> AbstractContextManager:
        return nullcontext()  # DeepSpeed knows the accumulation boundary from gradient_accumulation_steps

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divides the loss by grad_accum.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances DeepSpeed's micro-step counter

    def step(self, max_grad_norm: float | None) -> float:
        self.engine.step()  # clipping is `gradient_clipping` in the config
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, path: Path, background: bool = False) -> None:
        # DeepSpeed's own writer is synchronous here; a background save is written in the foreground.
        self.engine.save_checkpoint(
            str(path), tag="deepspeed", save_latest=False, exclude_frozen_parameters=self.trainable_only
        )

    def load(self, path: Path) -> None:
        self.engine.load_checkpoint(
            str(path), tag="deepspeed", load_lr_scheduler_states=False, load_module_strict=not self.trainable_only
        )

    def trainable_changed(self) -> None:
        raise FTLError("ZeRO fixes the trained parameters when it wraps the model; gradual unfreezing needs ddp.")
