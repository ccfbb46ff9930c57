"""FSDP2: `fully_shard` each transformer block, then the root. Parameters, gradients and optimizer
states are sharded (DTensor, dim 0) over the shard group; with several nodes the mesh is 2-D (HSDP:
shard within a node, replicate across nodes). `fsdp2_offload` keeps the shards in CPU memory.

The model arrives on the meta device, method applied, and is materialised shard by shard: no rank ever
holds the full model. What fills the shards (a folder's safetensors, a random init, 4-bit quantisation,
adapter init) is the caller's `Weights` (launcher/weights.py).
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from strategies.base import OptimizerFactory, RankContext, Weights
from strategies.config import StrategyConfig
from strategies.dcp_state import ReusedBufferStager, load_model_and_optimizer, save_model_and_optimizer


class FSDP2Strategy:
    name = "fsdp2"
    meta_init = True
    partitions_at_build = False
    offload = False

    def __init__(self, config: StrategyConfig, ctx: RankContext) -> None:
        self.config = config
        self.ctx = ctx
        self.stager = ReusedBufferStager()  # host buffers for background saves, kept from one save to the next

    def building(self) -> AbstractContextManager:
        return nullcontext()  # the loop builds on meta; setup() materialises the shards

    def mesh(self) -> DeviceMesh:
        world, group = self.ctx.world_size, self.config.shard_group
        if group >= world or world % group:  # launched on another world size than planned: shard over all
            return init_device_mesh(self.ctx.device.type, (world,), mesh_dim_names=("shard",))
        if group == world:
            return init_device_mesh(self.ctx.device.type, (world,), mesh_dim_names=("shard",))
        return init_device_mesh(self.ctx.device.type, (world // group, group), mesh_dim_names=("replicate", "shard"))

    def setup(
        self, model: torch.nn.Module, blocks: list[torch.nn.Module], build_optimizer: OptimizerFactory, weights: Weights | None = None
    ) -> None:
        buffers = {name: buf.detach().clone() for name, buf in model.named_buffers() if buf.device.type != "meta"}
        mesh = self.mesh()
        if self.ctx.compute_dtype == torch.float32:
            mp = MixedPrecisionPolicy()
        else:  # compute in bf16, reduce gradients in fp32: trainable params are sharded fp32 master copies
            mp = MixedPrecisionPolicy(param_dtype=self.ctx.compute_dtype, reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy(pin_memory=self.ctx.device.type == "cuda") if self.offload else OffloadPolicy()
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=True)
        # The root (embeddings, final norm, head) is needed again right at the start of backward.
        fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)

        if any(p.is_meta for p in model.parameters()):
            if weights is None:
                raise RuntimeError("a model on the meta device needs the Weights that fill its shards")
            model.to_empty(device="cpu" if self.offload else self.ctx.device)
            with torch.no_grad():
                for name, buf in buffers.items():  # non-persistent buffers (e.g. RoPE inv_freq) were real: restore
                    model.get_buffer(name).copy_(buf)
                weights.fill(model)
                if self.offload and self.ctx.device.type != "cpu":
                    # Offload moves parameter shards to the host, not buffers: the forward uses them on the
                    # GPU (BERT indexes its embeddings with position_ids), as torchtitan keeps them. to_empty
                    # put them on the host with the shards; move them back, as Module.to does (by _buffers).
                    for module in model.modules():
                        for key, buf in module._buffers.items():
                            if buf is not None:
                                module._buffers[key] = buf.to(self.ctx.device)
        # else: the model arrived built (see launcher/trainer.py for when) and fully_shard has kept only this
        # rank's shard of each parameter.
        self.model = model
        self.optimizer = build_optimizer(model)

    def accumulate(self, sync: bool) -> AbstractContextManager:
        # FSDP2: skip the reduce-scatter on non-final micro-batches; gradients accumulate unsharded.
        self.model.set_requires_gradient_sync(sync)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float | None) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm if max_grad_norm else float("inf"))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(norm)

    def save(self, path: Path, background: bool = False) -> Future | None:
        return save_model_and_optimizer(
            self.model, self.optimizer, path, self.ctx.writer_group, self.stager, background, self.config.trainable_only
        )

    def trainable_changed(self) -> None:
        raise RuntimeError("FSDP2 fixes the trained set when it wraps; strategies.catalog refuses gradual unfreezing here")

    def load(self, path: Path) -> None:
        load_model_and_optimizer(self.model, self.optimizer, path, self.config.trainable_only)


class FSDP2OffloadStrategy(FSDP2Strategy):
    name = "fsdp2_offload"
    offload = True
