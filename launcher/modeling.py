"""Build the job's model and optimizer (components; no knowledge of the CLI or the loop)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, get_cosine_with_min_lr_schedule_with_warmup

from launcher.model_info import build_config
from launcher.spec import JobSpec, TrainSpec


def pretrained_weights(spec: JobSpec) -> Path | None:
    """The folder whose weights the job starts from, or None for a random init."""
    if spec.model.name_or_path is not None and spec.model.init == "pretrained":
        return Path(spec.model.name_or_path)
    return None


def build_model(spec: JobSpec, meta: bool = False) -> torch.nn.Module:
    """The job's model in fp32 on the CPU, loaded or randomly initialised (seeded by the caller).

    With `meta`, parameters stay on the meta device (buffers are real: they are computed, not loaded)
    and the strategy materialises them shard by shard; see strategies/fsdp2.py.
    """
    if meta:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(build_config(spec.model), dtype=torch.float32)
        model.tie_weights()  # init_empty_weights re-registers parameters, which unties shared ones
    elif pretrained_weights(spec) is not None:
        model = AutoModelForCausalLM.from_pretrained(spec.model.name_or_path, local_files_only=True, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(build_config(spec.model), dtype=torch.float32)
    if spec.train.activation_checkpointing:
        # Non-reentrant checkpointing works under DDP/FSDP without find_unused_parameters.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def build_optimizer(model: torch.nn.Module, train: TrainSpec, device_type: str) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not norms, biases or other 1-D parameters)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, fused=device_type == "cuda")


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSpec) -> torch.optim.lr_scheduler.LRScheduler:
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=train.max_steps,
        min_lr_rate=train.min_lr_ratio,
    )
