"""FSDP2 with LoRA, QLoRA and prompt tuning holds a block or two unsharded at any moment of the step, as
full fine-tuning does. The arbiter is a real 2-process run on CPU, observed at each block's backward (when
an implementation that keeps every block gathered would show all of them); the fake-mode trace the
planner is checked with (launcher/measure.py) must see the same thing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_LLAMA, save_random_model, tiny_spec
from tests.hosts.unsharded_rank import UnshardedBlocks
from tests.strategies.test_meta_build import build_on_two_ranks

BLOCKS = 4
CONFIG = {**TINY_LLAMA, "num_hidden_layers": BLOCKS}
METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "lora": {"r": 4}},
    "qlora": {"name": "qlora", "lora": {"r": 4}},
    "prompt": {"name": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 4}},
}


@pytest.fixture(scope="module")
def four_block_model(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("four-blocks"), CONFIG)


# Activation checkpointing re-gathers each block for its recomputation: checked with the LoRA case.
@pytest.mark.parametrize("method, ac", [(m, False) for m in METHODS] + [("lora", True)], ids=[*METHODS, "lora+ac"])
def test_real_run_holds_at_most_two_blocks_unsharded(tmp_path: Path, four_block_model: Path, method: str, ac: bool) -> None:
    spec = tiny_spec(
        tmp_path,
        model={"name_or_path": str(four_block_model), "init": "pretrained"},
        method=METHODS[method],
        train={"activation_checkpointing": ac},
        hardware={"gpus_per_node": 2},
        strategy="fsdp2",
    )
    spec["model"].pop("config")
    ranks = json.loads(build_on_two_ranks(tmp_path, spec, "tests.hosts.unsharded_rank", "2").read_text())
    for rank in ranks:
        assert rank["blocks"] == BLOCKS
        assert len(rank["counts"]) == 2 * BLOCKS, rank  # every block's backward, in both steps
        # At least the block being back-propagated; at most it and the one prefetched.
        assert 1 <= min(rank["counts"]) and max(rank["counts"]) <= 2, f"{method}: unsharded blocks at each backward {rank['counts']}"
        assert all(loss == loss for loss in rank["losses"])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fake_mode_trace_sees_the_same(method: str) -> None:
    from launcher.measure import StepSetup, measure_step
    from launcher.model_info import build_config, transformer_blocks
    from launcher.spec import ModelSpec

    config = build_config(ModelSpec(config=CONFIG))
    seen: list[UnshardedBlocks] = []

    def build() -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        seen.append(UnshardedBlocks(transformer_blocks(model)))
        return model

    measure_step(StepSetup(config=config, strategy="fsdp2", world_size=2, micro_batch_size=2, seq_len=64, build=build))
    counts = seen[0].counts
    assert len(counts) == 2 * BLOCKS and 1 <= min(counts) and max(counts) <= 2, counts
