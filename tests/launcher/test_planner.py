"""The planner as a specification: pure function, monotone in size, method-aware, honest when nothing fits."""

from __future__ import annotations

from dataclasses import replace

import pytest

from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from launcher.memory import NF4_CONSTANT_BYTES_PER_PARAM, GiB, MiB, per_rank_memory
from launcher.model_info import model_shape
from launcher.planner import SHARDING_LEVEL, PlanRequest, lora_params, plan, qlora_frozen_bytes_per_param, request_from_spec
from launcher.spec import ModelSpec, load_spec
from tests.conftest import REPO

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
    return request(size, params_trainable=lora_params(SHAPES[size], 16), method="lora", lora_rank=16, **kw)


def qlora(size: str, **kw) -> PlanRequest:
    frozen = qlora_frozen_bytes_per_param(SHAPES[size], "bf16")
    return replace(lora(size, **kw), method="qlora", frozen_bytes_per_param=frozen)


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
    quantized = plan(replace(qlora(size), strategy="fsdp2")).per_rank
    assert adapter.grads < full.grads and adapter.optimizer < full.optimizer
    assert quantized.total < adapter.total < full.total


def test_lora_70b_fits_on_one_node():
    assert plan(lora("70b")).fits


def test_multi_node_prefers_sharding_within_a_node():
    # ZeRO-2 over 16 ranks needs 29.9 GiB (> 90% of 28 GB); FSDP2 sharded over one node's 8 GPUs fits.
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


@pytest.mark.parametrize("size", ["1b", "8b", "70b"])
@pytest.mark.parametrize("gpus, nodes", [(8, 1), (8, 8)])
def test_zero_model_states_never_below_deepspeeds_own_estimators(size, gpus, nodes):
    """DeepSpeed's estimate_zero{2,3}_model_states_mem_needs (what its *_all_cold tables print): ZeRO-2 keeps
    2 + 18/N B a parameter (the fp32 copy of the gradient partition included), ZeRO-3 18/N plus 4 B per
    parameter of the largest layer, offloaded ZeRO-3 that largest layer alone."""
    shape, world = SHAPES[size], gpus * nodes
    inputs = request(size, gpus=gpus, nodes=nodes).memory_inputs
    _, zero2 = estimate_zero2_model_states_mem_needs(shape.params_total, gpus, nodes, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(shape.params_total, shape.params_largest_tensor, gpus, nodes, cpu_offload=False)
    _, offload, _ = estimate_zero3_model_states_mem_needs(shape.params_total, shape.params_largest_tensor, gpus, nodes)
    assert per_rank_memory("zero2", inputs, world).model_states >= zero2
    assert per_rank_memory("zero3", inputs, world).model_states >= zero3
    assert per_rank_memory("zero3_offload", inputs, world).model_states >= offload


def test_short_sequences_peak_when_the_root_reduces_its_gradients():
    """Llama-3-8B, FSDP2 over 8 ranks, seq 1024: the end of backward (every block's sharded gradient, plus the
    embedding and head's unsharded bf16 gradients and their fp32 reduce-scatter input) is the peak: 20.34 GiB
    of tensors traced; planned 16.7 GiB before, from the optimizer step."""
    m = plan(request("8b", seq_len=1024, strategy="fsdp2")).per_rank
    assert m.peak_moment == "end of backward"
    assert m.total - m.overhead >= 20.3 * GiB


def test_classification_is_charged_its_head_not_vocabulary_logits():
    spec = load_spec(REPO / "configs" / "llama3-8b-full.yaml", ["task.name=classification", "task.num_labels=4"])
    req = request_from_spec(spec, SHAPES["8b"], "cuda")
    assert req.num_labels == 4
    assert req.shape.params_total == SHAPES["8b"].params_total - SHAPES["8b"].params_lm_head + 4 * 4096
    req = replace(req, strategy="fsdp2")
    causal = plan(replace(req, shape=SHAPES["8b"], params_trainable=SHAPES["8b"].params_total, num_labels=0)).per_rank
    classifier = plan(req).per_rank
    assert classifier.logits < MiB and causal.logits == 4096 * 128256 * 4
    # 2 GiB of fp32 logits and 4 GiB of loss temporaries at the causal LM's loss; the classifier peaks in the
    # first block's backward instead (the LM head's unsharded gradient is gone too).
    assert causal.total - classifier.total > 2.5 * GiB


def test_qlora_gathers_packed_blocks_and_keeps_its_constants_whole():
    """FSDP2 gathers QLoRA's blocks as packed 4-bit data (about a quarter of bf16) and shards that data, but
    every rank holds all the quantisation constants."""

    def gathered_per_block(req: PlanRequest) -> float:  # fsdp2_gradop gathers every block, fsdp2 two
        every = per_rank_memory("fsdp2_gradop", req.memory_inputs, 8).params
        return (every - per_rank_memory("fsdp2", req.memory_inputs, 8).params) / (SHAPES["70b"].num_layers - 2)

    assert gathered_per_block(qlora("70b")) < 0.27 * gathered_per_block(lora("70b"))
    constants = NF4_CONSTANT_BYTES_PER_PARAM * SHAPES["70b"].block_linear_params * SHAPES["70b"].num_layers
    root = 2 * SHAPES["70b"].params_embedding
    assert per_rank_memory("fsdp2", qlora("70b").memory_inputs, 4096).params > constants + root


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "fsdp2", "zero3", "zero3_offload", "fsdp2_offload"])
@pytest.mark.parametrize("size,changes", [("8b", {}), ("70b", {}), ("1b", {"seq_len": 512, "micro_batch_size": 8}),
                                          ("8b", {"method": "lora", "params_trainable": 20_000_000, "lora_rank": 16})])
def test_the_peak_moment_is_itemised_and_its_parts_add_up_to_the_total(strategy, size, changes):
    """`ftl plan`'s table lists `at_peak`: its parts plus the overhead are the total, to the byte, and they
    survive the plan's JSON round trip (plan.json, read by every rank)."""
    import json

    from launcher.planner import Plan

    p = plan(request(size, strategy=strategy, **changes))
    m = p.per_rank
    assert m.at_peak.total + m.overhead == m.total
    assert m.at_peak.total == max(m.backward_peak, m.backward_end_peak, m.step_peak)
    assert m.temporaries == m.at_peak.temporaries
    again = Plan.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p
