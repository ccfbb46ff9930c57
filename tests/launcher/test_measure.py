"""The measurement tool: fake-mode traces equal real steps, and the storage counter equals torch's tracker."""

from __future__ import annotations

import torch

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
