"""The DeepSpeed config FTL generates from a plan: a pure renderer (no deepspeed import), so that
`ftl plan` can show it and tests can compare it with a golden file."""

from __future__ import annotations

from strategies.catalog import traits
from strategies.config import StrategyConfig


def deepspeed_config(config: StrategyConfig, world_size: int | None = None) -> dict:
    """DeepSpeed JSON for a ZeRO strategy. `world_size` defaults to the planned one; ranks pass the real one."""
    world = world_size or config.world_size
    cuda = config.device == "cuda"
    strategy = traits(config.name)
    zero: dict = {
        "stage": strategy.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": cuda,  # overlapping needs a separate stream; on CPU it only adds buffers
        "reduce_bucket_size": 5 * 10**7,
        "allgather_bucket_size": 5 * 10**7,
    }
    if zero["stage"] == 3:
        zero |= {"stage3_prefetch_bucket_size": 5 * 10**7, "stage3_param_persistence_threshold": 10**5}
    if strategy.offload:
        zero |= {
            "offload_optimizer": {"device": "cpu", "pin_memory": cuda},
            "offload_param": {"device": "cpu", "pin_memory": cuda},
        }
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.micro_batch_size * config.grad_accum * world,
        "gradient_clipping": config.max_grad_norm or 0.0,
        "bf16": {"enabled": config.precision == "bf16"},
        "zero_optimization": zero,
        # FTL passes torch's AdamW: no C++ optimizer op to compile, same update as DDP/FSDP2.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
