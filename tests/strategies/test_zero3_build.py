"""ZeRO-3 builds the model partitioned (strategies/deepspeed.py `building()`): each rank holds its share of
every parameter from the moment it is created, whether drawn from the seed or read from a folder, so no
rank holds the whole model in host memory, and `deepspeed.initialize` has no whole model to move to a
GPU (the plan counts a partition). Real 2-rank builds; that the partitions hold the right values is
test_parity.py's zero3 runs (the same losses as DDP from the same folder)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import tiny_spec
from tests.strategies.test_meta_build import build_on_two_ranks


@pytest.mark.parametrize("strategy, source", [("zero3", "config"), ("zero3_offload", "folder"), ("zero2", "config")])
def test_zero3_ranks_hold_a_share_of_every_parameter_from_the_start(tmp_path: Path, tiny_model_dir: Path, strategy: str, source: str) -> None:
    model = {"name_or_path": str(tiny_model_dir), "init": "pretrained"} if source == "folder" else {}
    spec = tiny_spec(tmp_path, model=model, hardware={"gpus_per_node": 2}, strategy=strategy)
    if source == "folder":
        spec["model"].pop("config")
    prefix = build_on_two_ranks(tmp_path, spec, "tests.hosts.zero3_build_rank")
    ranks = [json.loads(Path(f"{prefix}-{rank}.json").read_text()) for rank in (0, 1)]
    whole = sum(size["whole"] for size in ranks[0]["sizes"].values())
    assert whole > 100_000 and len(ranks[0]["sizes"]) > 10
    for built in ranks:
        held = sum(size["held"] for size in built["sizes"].values())
        if strategy == "zero2":  # not partitioned: every rank builds the whole model
            assert not built["partitions_at_build"] and held == whole
            continue
        assert built["partitions_at_build"]
        for name, size in built["sizes"].items():
            assert size["held"] <= math.ceil(size["whole"] / 2), name  # a share, padded at most to even
        assert held <= whole / 2 + len(built["sizes"])


def test_adapters_added_after_a_partitioned_build_train_in_bf16(tmp_path: Path, tiny_model_dir: Path) -> None:
    """In bf16, zero.Init builds the base in bf16 and deepspeed.initialize then casts nothing, while PEFT's
    adapters are fp32 and a classifier's trained head copy bf16: ZeRO-3 asserts one dtype over its flat
    partitions (this run failed there). The strategy casts what came after the build, as DeepSpeed casts a
    model built whole. LoRA on a classifier from a folder, bf16 on CPU."""
    from tests.conftest import REPO, run_ftl, write_spec

    spec = tiny_spec(
        tmp_path, model={"name_or_path": str(tiny_model_dir), "init": "pretrained"}, hardware={"gpus_per_node": 2}, strategy="zero3",
        task={"name": "classification", "num_labels": 4}, data={"train": str(REPO / "configs/data/topics.jsonl")},
        method={"name": "lora", "lora": {"r": 4}}, train={"max_steps": 6, "log_every": 1, "lr": 3e-3, "precision": "bf16"},
    )
    spec["model"].pop("config")
    result = run_ftl("run", str(write_spec(tmp_path, spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
