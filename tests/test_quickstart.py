"""`ftl run` end to end: a real 2-process torchrun (gloo) fine-tune whose loss falls and whose
checkpoint reloads into a fresh model giving the same validation loss the run reported."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoModelForCausalLM

from launcher.data import build_tokenizer, load_examples
from launcher.model_info import build_config
from launcher.spec import load_spec
from tests.conftest import run_ftl


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    result = run_ftl(
        "run", "configs/quickstart.yaml", "train.max_steps=120", "train.log_every=10", "checkpoint.every=50",
        f"output_dir={out}", timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_loss_falls_by_a_clear_margin(quickstart_run):
    out, _ = quickstart_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[0] > 5.0  # ~ln(384): random init over the byte vocabulary
    assert losses[-1] < losses[0] - 3.0
    assert all({"step", "loss", "lr", "tokens_per_s", "elapsed_s"} <= r.keys() for r in records if "loss" in r)


def test_run_dir_holds_spec_plan_and_complete_checkpoints(quickstart_run):
    out, _ = quickstart_run
    plan = json.loads((out / "plan.json").read_text())
    assert plan["strategy"] == "ddp" and plan["world_size"] == 2
    assert load_spec(out / "spec.yaml").train.max_steps == 120  # the override is in the resolved spec
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-120"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-100", "step-120"]  # keep: 2
    manifest = json.loads((root / "step-120" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == 120
    for name, size in manifest["files"].items():
        assert (root / "step-120" / name).stat().st_size == size


def test_checkpoint_reloads_and_reproduces_validation_loss(quickstart_run):
    out, _ = quickstart_run
    spec = load_spec(out / "spec.yaml")
    model = AutoModelForCausalLM.from_config(build_config(spec.model))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(out / "checkpoints" / "step-120"))
    model.load_state_dict(state["model"])
    model.eval()

    examples, _ = load_examples(spec, build_tokenizer(spec), spec.data.validation)  # the last block's padding is masked
    with torch.no_grad():
        # The run evaluated rank r on blocks[r::2], up to 16 micro-batches each.
        split = {name: [t[r::2].split(spec.train.micro_batch_size)[:16] for r in range(2)] for name, t in examples.items()}
        batches = [{name: split[name][r][i] for name in examples} for r in range(2) for i in range(len(split["input_ids"][r]))]
        total = sum(model(**b).loss * len(b["input_ids"]) for b in batches)
        count = sum(len(b["input_ids"]) for b in batches)
    reported = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in l][-1]
    assert abs(float(total / count) - reported["val_loss"]) < 1e-4


def test_rerun_resumes_and_finds_the_run_complete(quickstart_run):
    out, _ = quickstart_run
    again = run_ftl("run", "configs/quickstart.yaml", "train.max_steps=120", "checkpoint.every=50", f"output_dir={out}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already complete at step 120" in again.stdout
    assert (out / "checkpoints" / "step-120").is_dir()
