"""The plan is the contract: over methods x devices x sizes x strategies (auto and every forced one),
whatever `ftl plan` chooses, `ftl run`'s pre-launch checks accept, and what they refuse the planner
never chooses. In-process (the same functions `ftl plan` and `ftl run --dry-run` call), on meta models."""

from __future__ import annotations

import itertools

import pytest

from launcher.cli import make_job_plan, preflight
from launcher.errors import FTLError
from launcher.spec import load_spec
from strategies.catalog import AUTO_ORDER, METHODS, STRATEGIES, refusal
from tests.conftest import REPO

METHOD_KEYS = {"gradual_unfreezing": ["method.gradual_unfreezing.every_steps=10"]}
# (config, overrides) from a tiny model on roomy GPUs (ddp) to 70B on two 24 GB GPUs (nothing fits).
SIZES = {
    "8b-8x80": ("llama3-8b-full.yaml", []),
    "8b-2x24": ("llama3-8b-full.yaml", ["hardware.gpus_per_node=2", "hardware.gpu_mem=24GB"]),
    "70b-2x24": ("llama3-70b-full.yaml", ["hardware.gpus_per_node=2", "hardware.gpu_mem=24GB", "train.seq_len=2048"]),
    "1b-1x80": ("llama3-8b-full.yaml", ["model.config.num_hidden_layers=2", "model.config.hidden_size=1024",
                                        "model.config.intermediate_size=4096", "hardware.gpus_per_node=1"]),
}


def spec_for(size: str, method: str, device: str, strategy: str = "auto"):
    config, overrides = SIZES[size]
    return load_spec(
        REPO / "configs" / config,
        [*overrides, f"method.name={method}", *METHOD_KEYS.get(method, []), f"hardware.device={device}", f"strategy={strategy}"],
    )


@pytest.mark.parametrize("size, method, device", list(itertools.product(SIZES, METHODS, ("cuda", "cpu"))))
def test_what_the_planner_chooses_the_run_accepts(size, method, device):
    spec = spec_for(size, method, device)
    chosen = make_job_plan(spec)
    assert not refusal(method, chosen.strategy, device), chosen.reason  # never a refused combination
    if chosen.fits:
        assert preflight(spec).strategy == chosen.strategy
    # Forced to what auto chose, the run's checks (incl. the method's pre-load checks) accept it too.
    forced = spec_for(size, method, device, chosen.strategy)
    assert preflight(forced).strategy == chosen.strategy or not chosen.fits


@pytest.mark.parametrize("method, strategy", [(m, s) for m in METHODS for s in STRATEGIES if refusal(m, s, "cuda")])
def test_refused_combinations_fail_before_anything_runs(method, strategy):
    with pytest.raises(FTLError, match=f"`strategy: {strategy}` is refused"):
        make_job_plan(spec_for("1b-1x80", method, "cuda", strategy))


def test_qlora_70b_on_two_24gb_gpus_never_plans_zero3():
    chosen = make_job_plan(spec_for("70b-2x24", "qlora", "cuda"))
    assert chosen.strategy not in ("zero3", "zero3_offload")
    refused = dict(chosen.rejected)
    assert "zero3_offload" in refused and "4-bit" in refused["zero3_offload"]


def test_the_table_covers_every_method_and_strategy():
    assert set(AUTO_ORDER) <= set(STRATEGIES)
    for method in METHODS:  # every method runs with at least ddp, everywhere
        assert not refusal(method, "ddp", "cpu") and not refusal(method, "ddp", "cuda")


def test_70b_lora_on_one_node_of_8x80_is_fsdp2_without_offload():
    """As torchtune's lora_finetune_distributed runs it. Before the trace fix the plan charged every block's
    unsharded weights (the fake-mode counter missed FSDP2's storage resizes) and chose zero3_offload."""
    chosen = make_job_plan(spec_for("8b-8x80", "lora", "cuda").model_copy(
        update={"model": load_spec(REPO / "configs/llama3-70b-full.yaml").model}
    ))
    assert chosen.fits and chosen.strategy == "fsdp2", chosen.reason
    assert chosen.per_rank.total < 45 * 2**30
