"""The DeepSpeed JSON FTL renders from a plan: golden files, so a change to it is a visible diff.
Regenerate with FTL_UPDATE_GOLDEN=1 after checking the new config by eye."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from launcher.planner import plan
from launcher.spec import load_spec
from launcher.model_info import model_shape
from launcher.planner import request_from_spec
from launcher.job import strategy_config
from strategies.deepspeed_config import deepspeed_config
from tests.conftest import REPO

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_config_matches_golden(strategy):
    spec = load_spec(REPO / "configs/llama3-8b-full.yaml", [f"strategy={strategy}"])
    job_plan = plan(request_from_spec(spec, model_shape(spec.model), "cuda"))
    rendered = json.dumps(deepspeed_config(strategy_config(spec, job_plan)), indent=2, sort_keys=True) + "\n"
    golden = GOLDEN / f"deepspeed-{strategy}.json"
    if os.environ.get("FTL_UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()


def test_batch_size_follows_the_real_world_size():
    spec = load_spec(REPO / "configs/llama3-8b-full.yaml", ["strategy=zero2"])
    job_plan = plan(request_from_spec(spec, model_shape(spec.model), "cpu"))
    config = deepspeed_config(strategy_config(spec, job_plan), world_size=2)
    assert config["train_batch_size"] == 1 * 8 * 2
    assert config["bf16"]["enabled"] is False and config["zero_optimization"]["overlap_comm"] is False


def test_plan_writes_deepspeed_json_beside_the_run(tmp_path):
    from tests.conftest import run_ftl

    result = run_ftl("run", "configs/quickstart.yaml", "strategy=zero2", f"output_dir={tmp_path}/r", "--dry-run")
    assert result.returncode == 0 and '"stage": 2' in result.stdout
