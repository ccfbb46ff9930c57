"""DDP: every rank holds the whole model; gradients are all-reduced in buckets during backward."""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from strategies.base import OptimizerFactory, RankContext, Weights
from strategies.config import StrategyConfig
from strategies.dcp_state import ReusedBufferStager, load_model_and_optimizer, save_model_and_optimizer


class DDPStrategy:
    name = "ddp"
    meta_init = False  # every rank holds the whole model anyway
    partitions_at_build = False

    def __init__(self, config: StrategyConfig, ctx: RankContext) -> None:
        self.config = config
        self.ctx = ctx
        self.stager = ReusedBufferStager()  # host buffers for background saves, kept from one save to the next

    def building(self) -> AbstractContextManager:
        return nullcontext()  # every rank builds the whole model

    def setup(
        self, model: torch.nn.Module, blocks: list[torch.nn.Module], build_optimizer: OptimizerFactory, weights: Weights | None = None
    ) -> None:
        # `blocks` and `weights` are unused: the model arrives loaded (DDP has no meta-device init).
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        # gradient_as_bucket_view: grads alias the all-reduce buckets instead of doubling their memory.
        self.model = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        self.optimizer = build_optimizer(self.model)

    def accumulate(self, sync: bool) -> AbstractContextManager:
        return nullcontext() if sync else self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float | None) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # keep the bucket views alive
        return float(norm)

    def save(self, path: Path, background: bool = False) -> Future | None:
        return save_model_and_optimizer(
            self.model, self.optimizer, path, self.ctx.writer_group, self.stager, background, self.config.trainable_only
        )

    def trainable_changed(self) -> None:
        # DDP's reducer covers the parameters that required grad when it was built: rebuild the wrapper
        # (same parameter objects, so the optimizer is unaffected; the broadcast re-syncs nothing new).
        self.model = DistributedDataParallel(self.model.module, device_ids=self.model.device_ids, gradient_as_bucket_view=True)

    def load(self, path: Path) -> None:
        load_model_and_optimizer(self.model, self.optimizer, path, self.config.trainable_only)
