"""The measurement tool: fake-mode traces equal real steps, and the storage counter equals torch's tracker."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from launcher.accuracy import model_config
from launcher.measure import StepSetup, StoragePeak, measure_step


def test_fake_trace_equals_real_step():
    for strategy in ("ddp", "fsdp2"):
        setup = StepSetup(model_config("tiny"), strategy, 1, 2, 128, "fp32", fake=False)
        real = measure_step(setup)
        fake = measure_step(StepSetup(**{**setup.__dict__, "fake": True}))
        assert fake == real


def test_more_shards_lower_the_peak():
    # Short sequences: the peak is the optimizer step, made of model states that sharding divides.
    two = measure_step(StepSetup(model_config("125m"), "fsdp2", 2, 1, 64, "fp32"))
    four = measure_step(StepSetup(model_config("125m"), "fsdp2", 4, 1, 64, "fp32"))
    assert four.peak < 0.7 * two.peak


def test_storage_peak_counts_live_storages():
    a = torch.ones(1000)
    with StoragePeak(a) as tracker:
        b = a * 2  # 4 kB more
        del b
        c = a + 1
    assert tracker.peak == 8000
    assert tracker.current == 8000  # `a` and `c`
    del c


def test_lora_trace_runs_on_a_frozen_base():
    lora = measure_step(StepSetup(model_config("tiny"), "ddp", 1, 2, 64, "fp32", lora_rank=4, fake=False))
    full = measure_step(StepSetup(model_config("tiny"), "ddp", 1, 2, 64, "fp32", fake=False))
    assert 0 < lora.peak < full.peak


def test_qlora_fake_trace_equals_real_step():
    """bitsandbytes' 4-bit ops have fake kernels: a QLoRA step traces without real weights (70B on 2 ranks)."""
    for strategy in ("ddp", "fsdp2"):
        setup = StepSetup(model_config("tiny"), strategy, 1, 2, 64, "bf16", lora_rank=4, quantized=True, fake=False)
        real = measure_step(setup)
        assert real == measure_step(StepSetup(**{**setup.__dict__, "fake": True}))


def test_quantisation_constants_are_counted_on_every_rank():
    """FSDP2 shards the packed 4-bit data, not the constants each Linear4bit keeps beside it."""
    one = measure_step(StepSetup(model_config("125m"), "fsdp2", 1, 1, 64, "bf16", lora_rank=4, quantized=True))
    four = measure_step(StepSetup(model_config("125m"), "fsdp2", 4, 1, 64, "bf16", lora_rank=4, quantized=True))
    constants = 12 * (4 * 768 * 768 + 3 * 768 * 2048) // 64  # one 8-bit absmax per 64 weights, whole on each rank
    assert one.other >= constants and four.other >= constants


def test_first_step_sharding_propagation_is_not_counted():
    """Under fake tensors DTensor builds global-shape arguments the first time it meets an op, which the tracker
    would count as optimizer memory; the measured step follows an untracked one."""
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config("125m")).parameters())
    m = measure_step(StepSetup(model_config("125m"), "fsdp2", 2, 1, 64, "fp32"))
    moments_and_step_scratch = 8 * params + 2 * 4 * 32000 * 768  # AdamW's two fp32 moments, two embedding-sized buffers
    assert m.optimizer <= 1.01 * moments_and_step_scratch / 2  # (counted in the first step: 1.4x)


def test_classification_step_has_no_vocabulary_logits():
    lm = measure_step(StepSetup(model_config("125m"), "fsdp2", 8, 4, 256, "bf16"))
    classifier = measure_step(StepSetup(model_config("125m"), "fsdp2", 8, 4, 256, "bf16", num_labels=3))
    logits_and_loss = 4 * 256 * 32000 * 12  # fp32 logits and two fp32 temporaries of the cross-entropy
    assert lm.peak - classifier.peak > 0.8 * logits_and_loss
