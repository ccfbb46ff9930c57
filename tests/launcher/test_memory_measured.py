"""The planner's model-state bytes equal what DDP + AdamW really hold after one step (tensor storages)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from launcher.memory import MemoryInputs, per_rank_memory
from launcher.model_info import build_config, model_shape
from launcher.modeling import build_optimizer
from launcher.spec import ModelSpec, TrainSpec
from tests.conftest import TINY_LLAMA


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one bucket count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def test_ddp_model_states_match_prediction_within_2_percent():
    spec = ModelSpec(config=TINY_LLAMA)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(AutoModelForCausalLM.from_config(build_config(spec)), gradient_as_bucket_view=True)
        optimizer = build_optimizer(model, TrainSpec(max_steps=1, lr=1e-3), "cpu")
        batch = torch.randint(0, 384, (2, 32))
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()

        params = storage_bytes(p for p in model.parameters())
        grads = storage_bytes(p.grad for p in model.parameters())
        states = storage_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        measured = params + grads + states
    finally:
        dist.destroy_process_group()

    shape = model_shape(spec)
    inputs = MemoryInputs(shape, shape.params_total, 4, "fp32", "cpu", 2, 32, False)
    predicted = per_rank_memory("ddp", inputs, shard=1).model_states
    assert abs(predicted / measured - 1) < 0.02, (predicted, measured, params, grads, states)
