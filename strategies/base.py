"""What every strategy provides to the one training loop in launcher/trainer.py.

A strategy is applied to a model (parallelism as a function, not a subclass) and owns what differs
between DDP, FSDP2 and DeepSpeed: wrapping, gradient sync during accumulation, backward, the
optimizer step with clipping, and how its state is saved and loaded.
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

import torch.distributed as dist

from strategies.config import StrategyConfig


@dataclass(frozen=True)
class RankContext:
    """Where this rank runs: its place in the job, its device and compute dtype, and a CPU (gloo) group
    of its own for background checkpoint writers (their collectives run in a thread and must never
    interleave with the loop's). The rank runtime (launcher/runtime.py) creates and destroys the group."""

    rank: int
    world_size: int
    device: torch.device
    compute_dtype: torch.dtype  # bf16 under mixed precision, else fp32
    writer_group: dist.ProcessGroup | None = None

    def autocast(self) -> AbstractContextManager:
        enabled = self.compute_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=enabled)


OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


class Weights(Protocol):
    """What fills a model a meta-initialising strategy has just allocated (each rank its own shards)."""

    def fill(self, model: torch.nn.Module) -> None: ...


class Strategy(Protocol):
    name: str
    meta_init: bool  # True: the loop builds the model on the meta device and setup() materialises it
    partitions_at_build: bool  # True: the model is built partitioned across ranks, where building() puts it
    model: torch.nn.Module  # the wrapped model; call it for forward
    optimizer: torch.optim.Optimizer

    def __init__(self, config: StrategyConfig, ctx: RankContext) -> None: ...

    def setup(
        self, model: torch.nn.Module, blocks: list[torch.nn.Module], build_optimizer: OptimizerFactory, weights: Weights | None
    ) -> None:
        """Wrap `model` (whose repeated transformer blocks are `blocks`) and build its optimizer over the
        wrapped parameters. Unless `meta_init`, the model arrives loaded on ctx.device; with it, on meta,
        and `weights` fills it once it is sharded and allocated."""

    def building(self) -> AbstractContextManager:
        """Context the loop builds the model in (ZeRO-3: partitioned as it is created)."""
        return nullcontext()

    def accumulate(self, sync: bool) -> AbstractContextManager:
        """Context for one micro-batch's forward+backward; gradients sync across ranks only if `sync`."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, max_grad_norm: float | None) -> float:
        """Clip (if asked), step the optimizer, zero the gradients. Returns the global grad norm."""

    def save(self, path: Path, background: bool = False) -> Future | None:
        """Collective: every rank writes its part of model and optimizer state under `path`. With
        `background` it may return a future and go on writing while training continues."""

    def load(self, path: Path) -> None:
        """Collective: load what `save` wrote, resharding if the world size changed."""

    def trainable_changed(self) -> None:
        """Parameters were unfrozen (gradual unfreezing): make gradient sync cover them from now on. Called
        only where strategies.catalog says the trained set can grow."""
