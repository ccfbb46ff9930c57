"""The planner as a specification: pure function, monotone in size, method-aware, honest when nothing fits."""

from __future__ import annotations

from dataclasses import replace

import pytest

from launcher.memory import GiB
from launcher.model_info import model_shape
from launcher.planner import SHARDING_LEVEL, PlanRequest, lora_params, plan, qlora_frozen_bytes_per_param
from launcher.spec import ModelSpec

LLAMA = {"model_type": "llama", "num_key_value_heads": 8, "tie_word_embeddings": False}
SIZES = {
    "125m": dict(LLAMA, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    "1b": dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, vocab_size=128256),
    "8b": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, vocab_size=128256),
    "70b": dict(LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, vocab_size=128256),
}
SHAPES = {name: model_shape(ModelSpec(config=cfg)) for name, cfg in SIZES.items()}


def request(size: str, gpus: int = 8, nodes: int = 1, mem_gb: int = 80, **changes) -> PlanRequest:
    shape = SHAPES[size]
    base = PlanRequest(
        shape=shape,
        params_trainable=shape.params_total,
        frozen_bytes_per_param=2,
        micro_batch_size=1,
        seq_len=4096,
        activation_checkpointing=True,
        precision="bf16",
        device="cuda",
        nodes=nodes,
        gpus_per_node=gpus,
        gpu_mem_bytes=mem_gb * 10**9,
        cpu_mem_bytes=10**12,
    )
    return replace(base, **changes)


def lora(size: str, **kw) -> PlanRequest:
    return request(size, params_trainable=lora_params(SHAPES[size], 16), method="lora", **kw)


def test_125m_on_8_gpus_picks_ddp():
    assert plan(request("125m")).strategy == "ddp"


def test_8b_full_on_8x80_picks_a_sharded_strategy():
    p = plan(request("8b"))
    assert p.fits and p.strategy in ("zero1", "zero2", "fsdp2", "zero3")
    assert ("ddp", p.rejected[0][1]) == p.rejected[0]  # DDP was tried first and said why not
    assert "over 90%" in p.rejected[0][1]


def test_70b_full_on_8x80_is_refused_or_offloaded_with_reason():
    p = plan(request("70b"))
    assert (not p.fits) or p.strategy.endswith("offload")
    assert "GiB" in p.reason
    if not p.fits:
        assert any("LoRA" in s for s in p.suggestions)
        assert any("QLoRA" in s for s in p.suggestions)
        assert any("more GPUs" in s and "nodes" in s for s in p.suggestions)


def test_70b_with_more_host_memory_offloads():
    p = plan(request("70b", cpu_mem_bytes=2 * 10**12))
    assert p.fits and p.strategy == "zero3_offload"
    assert p.per_rank.host > 0


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("mem_gb", [24, 40, 80])
def test_bigger_model_never_gets_less_sharding(gpus, mem_gb):
    levels = []
    for size in ("125m", "1b", "8b", "70b"):
        p = plan(request(size, gpus=gpus, mem_gb=mem_gb))
        levels.append(SHARDING_LEVEL[p.strategy] if p.fits else 99)
    assert levels == sorted(levels)


@pytest.mark.parametrize("size", ["1b", "8b", "70b"])
def test_fewer_gpus_never_get_less_sharding(size):
    levels = []
    for gpus in (64, 32, 16, 8, 4, 2, 1):
        nodes, per_node = max(1, gpus // 8), min(gpus, 8)
        p = plan(request(size, gpus=per_node, nodes=nodes))
        levels.append(SHARDING_LEVEL[p.strategy] if p.fits else 99)
    assert levels == sorted(levels)


@pytest.mark.parametrize("size", ["125m", "1b", "8b", "70b"])
def test_frozen_and_lora_need_less_memory_than_full(size):
    full = plan(replace(request(size), strategy="fsdp2")).per_rank
    adapter = plan(replace(lora(size), strategy="fsdp2")).per_rank
    qlora = plan(replace(lora(size), strategy="fsdp2", frozen_bytes_per_param=qlora_frozen_bytes_per_param(SHAPES[size], "bf16"))).per_rank
    assert adapter.grads < full.grads and adapter.optimizer < full.optimizer
    assert qlora.total < adapter.total < full.total


def test_lora_70b_fits_on_one_node():
    assert plan(lora("70b")).fits


def test_multi_node_prefers_sharding_within_a_node():
    # ZeRO-2 over 16 ranks needs 26.7 GiB (> 90% of 28 GB); FSDP2 sharded over one node's 8 GPUs fits.
    p = plan(request("8b", nodes=2, mem_gb=28))
    assert p.strategy == "fsdp2" and p.shard_group == 8 and p.replicas == 2
    assert "HSDP" in p.reason


def test_forced_strategy_that_does_not_fit_warns_with_numbers():
    p = plan(request("8b", strategy="ddp"))
    assert p.strategy == "ddp" and not p.fits
    assert p.warnings and "GiB" in p.warnings[0] and "ddp" in p.warnings[0]


def test_forced_strategy_that_fits_says_what_auto_would_pick():
    p = plan(request("125m", strategy="fsdp2"))
    assert p.fits and "auto would pick ddp" in p.reason


def test_activation_checkpointing_and_micro_batch_move_activations():
    on = plan(request("8b", micro_batch_size=4)).per_rank
    off = plan(request("8b", micro_batch_size=4, activation_checkpointing=False, strategy="fsdp2")).per_rank
    assert off.activations > 5 * on.activations
    assert plan(request("8b", micro_batch_size=1)).per_rank.logits * 4 == on.logits


def test_plan_json_has_the_documented_keys():
    d = plan(request("8b")).to_dict()
    for key in ("params_total", "params_trainable", "strategy", "fits", "per_rank_bytes", "rejected"):
        assert key in d
    assert set(d["per_rank_bytes"]) >= {"params", "grads", "optimizer", "activations", "logits", "overhead", "total"}
    assert d["per_rank_bytes"]["total"] < 72 * 10**9
    assert d["per_rank_bytes"]["total"] > 10 * GiB


def test_gradual_unfreezing_is_planned_on_ddp_only():
    """Unfreezing adds trained parameters mid-run, which only DDP's re-wrap supports."""
    assert plan(request("1b", method="gradual_unfreezing")).strategy == "ddp"
    result = plan(request("8b", method="gradual_unfreezing"))
    assert not result.fits and result.strategy == "ddp" and "runs with ddp only" in result.reason
    assert any("more GPUs do not help" in line for line in result.suggestions)
    assert dict(result.rejected)["fsdp2"].startswith("gradual unfreezing adds trained parameters")
