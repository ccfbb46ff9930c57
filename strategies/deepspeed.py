"""DeepSpeed ZeRO stage 1, 2, 3 and ZeRO-3 with optimizer and parameter offload to the CPU, through
`deepspeed.initialize` with the config rendered by strategies/deepspeed_config.py (also written to the
run dir as deepspeed.json). Checkpoints use DeepSpeed's own `save_checkpoint`/`load_checkpoint`."""

from __future__ import annotations

import importlib
import os
import pickle
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch

from strategies.base import OptimizerFactory, RankContext, Weights
from strategies.config import StrategyConfig
from strategies.deepspeed_config import deepspeed_config
from strategies.errors import FTLError


def import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise FTLError(
            "The plan uses DeepSpeed (ZeRO), which is not installed. Install it with `pip install -c constraints.txt "
            ".[deepspeed]`, or force a native strategy: `strategy=fsdp2` (sharded) or `strategy=ddp`."
        ) from None
    return deepspeed


# The DeepSpeed classes its ZeRO checkpoint files hold besides tensors and plain containers.
_CHECKPOINT_CLASSES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@contextmanager
def weights_only_loads(path: Path) -> Iterator[None]:
    """Make DeepSpeed's reads of a checkpoint under `path` safe. DeepSpeed calls
    `torch.load(weights_only=False)`, plain unpickling, in its engine and in zero_to_fp32, with no way to
    ask otherwise; torch forces its weights-only unpickler when TORCH_FORCE_WEIGHTS_ONLY_LOAD is set
    (read at each call), and the few DeepSpeed classes above are allowed by name."""
    import_deepspeed()
    allowed = [getattr(importlib.import_module(module), name) for module, name in _CHECKPOINT_CLASSES]
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as error:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)", str(error))
        what = f"`{found.group(1)}`" if found else "something other than tensors and DeepSpeed's own checkpoint classes"
        raise FTLError(
            f"A DeepSpeed file under {path} asks to load {what}, so FTL refuses to unpickle it. The checkpoint was not "
            "written by this FTL/DeepSpeed or was tampered with; resume from another one (`checkpoint.on_corrupt=previous`) "
            "or `--no-resume`."
        ) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


class DeepSpeedStrategy:
    meta_init = False

    def __init__(self, config: StrategyConfig, ctx: RankContext) -> None:
        self.ctx = ctx
        self.name = config.name
        self.trainable_only = config.trainable_only
        self.ds_config = deepspeed_config(config, ctx.world_size)
        self.hf_config = None
        if ctx.device.type == "cuda":
            # DeepSpeed (zero.Init, the engine) picks its GPU from LOCAL_RANK. Under Ray the rank's GPU is the
            # one Ray gave it (launcher/rank_env.py device_index), which need not be the local rank's.
            os.environ["LOCAL_RANK"] = str(ctx.device.index)

    @property
    def partitions_at_build(self) -> bool:
        return self.ds_config["zero_optimization"]["stage"] == 3

    def building(self) -> AbstractContextManager:
        """ZeRO-3 builds the model partitioned: transformers' from_config / from_pretrained enter
        deepspeed.zero.Init while an HfDeepSpeedConfig is alive, so each parameter is split across the
        ranks as it is created and pretrained weights are read into the partitions. Built whole instead,
        every rank would hold the full fp32 model in host memory, and deepspeed.initialize would move all
        of it to every GPU before partitioning (the plan counts a partition). The config object stays alive
        for the run: transformers and PEFT find it through a weak reference."""
        if self.partitions_at_build and self.hf_config is None:
            from transformers.integrations import HfDeepSpeedConfig

            deepspeed = import_deepspeed()
            # zero.Init reads the world from DeepSpeed's comm layer: let it adopt the runtime's group first,
            # as deepspeed.initialize would later.
            deepspeed.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name())
            self.hf_config = HfDeepSpeedConfig(self.ds_config)
        return nullcontext()

    def setup(
        self, model: torch.nn.Module, blocks: list[torch.nn.Module], build_optimizer: OptimizerFactory, weights: Weights | None = None
    ) -> None:
        deepspeed = import_deepspeed()
        if self.hf_config is not None and self.ctx.compute_dtype != torch.float32:
            # Built partitioned, the base is in bf16 already (zero.Init's dtype) and deepspeed.initialize skips
            # its cast of the module, so what was added after the build (PEFT's adapters and prompt, upcast to
            # fp32; a copied head) would stay fp32, and ZeRO-3 needs one dtype over its flat partitions. Cast
            # them as the engine casts a model built whole.
            for param in model.parameters():
                if not hasattr(param, "ds_id") and param.is_floating_point() and param.dtype != self.ctx.compute_dtype:
                    param.data = param.data.to(self.ctx.compute_dtype)
        optimizer = build_optimizer(model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
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
        with weights_only_loads(path):
            self.engine.load_checkpoint(
                str(path), tag="deepspeed", load_lr_scheduler_states=False, load_module_strict=not self.trainable_only
            )

    def trainable_changed(self) -> None:
        raise RuntimeError("ZeRO fixes the trained set when it wraps; strategies.catalog refuses gradual unfreezing here")
