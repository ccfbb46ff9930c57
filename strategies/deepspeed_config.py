"""The DeepSpeed config FTL generates from a plan: a pure renderer (no deepspeed import), so that
`ftl plan` can show it and tests can compare it with a golden file."""

from __future__ import annotations

from launcher.planner import Plan
from launcher.spec import TrainSpec

ZERO_STAGE = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}
DEEPSPEED_STRATEGIES = tuple(ZERO_STAGE)


def deepspeed_config(plan: Plan, train: TrainSpec, world_size: int | None = None) -> dict:
    """DeepSpeed JSON for `plan`. `world_size` defaults to the planned one; the ranks pass the real one."""
    world = world_size or plan.request.world_size
    cuda = plan.request.device == "cuda"
    zero: dict = {
        "stage": ZERO_STAGE[plan.strategy],
        "contiguous_gradients": True,
        "overlap_comm": cuda,  # overlapping needs a separate stream; on CPU it only adds buffers
        "reduce_bucket_size": 5 * 10**7,
        "allgather_bucket_size": 5 * 10**7,
    }
    if zero["stage"] == 3:
        zero |= {"stage3_prefetch_bucket_size": 5 * 10**7, "stage3_param_persistence_threshold": 10**5}
    if plan.strategy == "zero3_offload":
        zero |= {
            "offload_optimizer": {"device": "cpu", "pin_memory": cuda},
            "offload_param": {"device": "cpu", "pin_memory": cuda},
        }
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "bf16": {"enabled": plan.request.precision == "bf16"},
        "zero_optimization": zero,
        # FTL passes torch's AdamW: no C++ optimizer op to compile, same update as DDP/FSDP2.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
