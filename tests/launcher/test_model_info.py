"""Parameter counts come from the meta device and match real models and published figures."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from launcher.model_info import build_config, model_shape
from launcher.spec import ModelSpec, load_spec
from tests.conftest import REPO, TINY_LLAMA


def test_tiny_count_equals_instantiated_model():
    spec = ModelSpec(config=TINY_LLAMA)
    model = AutoModelForCausalLM.from_config(build_config(spec))
    real = sum(p.numel() for p in model.parameters())
    shape = model_shape(spec)
    assert shape.params_total == real
    assert shape.num_layers == 2
    assert shape.params_largest_block == sum(p.numel() for p in model.model.layers[0].parameters())


@pytest.mark.parametrize("config,published", [("llama3-8b-full.yaml", 8.03e9), ("llama3-70b-full.yaml", 70.6e9)])
def test_real_size_counts_match_published(config, published):
    spec = load_spec(REPO / "configs" / config)
    count = model_shape(spec.model).params_total
    assert abs(count / published - 1) < 0.005


def test_meta_count_allocates_no_weights():
    """A 70B count must not touch real memory: the meta model holds no storage."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model_shape(load_spec(REPO / "configs/llama3-70b-full.yaml").model)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 2 * 1024 * 1024  # far below the 280 GB the fp32 weights would need


def test_gpt2_and_bert_like_families_are_sized():
    gpt2 = model_shape(ModelSpec(config={"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 384}))
    assert gpt2.num_layers == 2 and gpt2.hidden_size == 64
    assert gpt2.params_total == sum(
        p.numel() for p in AutoModelForCausalLM.from_config(build_config(ModelSpec(config={"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 384}))).parameters()
    )
    assert torch.tensor(0).device.type == "cpu"
