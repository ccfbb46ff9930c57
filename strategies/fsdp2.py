"""FSDP2: `fully_shard` each transformer block, then the root. Parameters, gradients and optimizer
states are sharded (DTensor, dim 0) over the shard group; with several nodes the mesh is 2-D (HSDP:
shard within a node, replicate across nodes). `fsdp2_offload` keeps the shards in CPU memory.

The model arrives on the meta device and is materialised shard by shard: no rank ever holds the full
model. Weights then come either from the local folder's safetensors, one tensor at a time (each rank
keeps only its slice), or from a random init of the local shards.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from strategies.base import OptimizerFactory, RankContext
from strategies.config import StrategyConfig
from strategies.dcp_state import ReusedBufferStager, load_model_and_optimizer, save_model_and_optimizer
from strategies.errors import FTLError


class FSDP2Strategy:
    name = "fsdp2"
    meta_init = True
    offload = False

    def __init__(self, config: StrategyConfig, ctx: RankContext) -> None:
        self.config = config
        self.ctx = ctx
        self.stager = ReusedBufferStager()  # host buffers for background saves, kept from one save to the next

    def mesh(self) -> DeviceMesh:
        world, group = self.ctx.world_size, self.config.shard_group
        if group >= world or world % group:  # launched on another world size than planned: shard over all
            return init_device_mesh(self.ctx.device.type, (world,), mesh_dim_names=("shard",))
        if group == world:
            return init_device_mesh(self.ctx.device.type, (world,), mesh_dim_names=("shard",))
        return init_device_mesh(self.ctx.device.type, (world // group, group), mesh_dim_names=("replicate", "shard"))

    def setup(
        self, model: torch.nn.Module, blocks: list[torch.nn.Module], build_optimizer: OptimizerFactory, weights: Path | None = None
    ) -> None:
        buffers = {name: buf.detach().clone() for name, buf in model.named_buffers() if buf.device.type != "meta"}
        mesh = self.mesh()
        if self.ctx.compute_dtype == torch.float32:
            mp = MixedPrecisionPolicy()
        else:  # compute in bf16, reduce gradients in fp32: the sharded fp32 params are the master copy
            mp = MixedPrecisionPolicy(param_dtype=self.ctx.compute_dtype, reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy(pin_memory=self.ctx.device.type == "cuda") if self.offload else OffloadPolicy()
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=True)
        # The root (embeddings, final norm, head) is needed again right at the start of backward.
        fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)

        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device="cpu" if self.offload else self.ctx.device)
            with torch.no_grad():
                for name, buf in buffers.items():  # non-persistent buffers (e.g. RoPE inv_freq) were real: restore
                    model.get_buffer(name).copy_(buf)
                if weights is None:
                    init_local_shards(model, self.ctx.rank)
                else:
                    load_safetensors_into_shards(model, weights)
        # else: the model arrived built (PEFT wrappers, new task heads, 4-bit bases) and fully_shard has
        # already kept only this rank's shard of each parameter.
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


def init_local_shards(model: torch.nn.Module, rank: int) -> None:
    """Random init of each rank's shards with the model's own init rule; seeded per rank so that the
    shards of one tensor are independent draws rather than copies."""
    torch.manual_seed(torch.initial_seed() + rank)
    # `_init_weights` is the model's per-module init rule; `initialize_weights()` would skip every module
    # already flagged as initialised by from_config, which under meta init means all of them.
    with warnings.catch_warnings():  # on a CPU mesh each rank draws its local shard itself: intended here
        warnings.filterwarnings("ignore", message="DTensor random operators")
        model.apply(model._init_weights)


def load_safetensors_into_shards(model: torch.nn.Module, folder: Path) -> None:
    """Stream a HF folder's safetensors into the sharded parameters, one tensor at a time: each rank
    reads the tensor and keeps only its own slice (no collective, no full model in memory)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FTLError(f"The model folder {folder} has no *.safetensors files; FSDP2 loads weights from safetensors.")
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as fh:
            for key in fh.keys():
                param = params.get(key)
                if param is None:
                    continue
                full = fh.get_tensor(key).to(param.dtype)
                if isinstance(param, DTensor):
                    local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
                    param.to_local().copy_(local)
                else:
                    param.copy_(full)
                loaded.add(key)
    missing = set(params) - loaded - _tied_names(model)
    if missing:
        raise FTLError(f"The safetensors in {folder} lack {len(missing)} parameters of the model, e.g. {sorted(missing)[:3]}.")


def _tied_names(model: torch.nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied)
