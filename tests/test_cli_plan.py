"""`ftl plan` as a user sees it: text and JSON, exit codes, and every shipped config plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.spec import load_spec
from tests.conftest import REPO, run_ftl

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_loads_and_plans(config, capsys):
    load_spec(config)
    code = main(["plan", str(config), "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert code == (0 if plan["fits"] else 2)


def test_plan_json_for_8b(capsys):
    assert main(["plan", "configs/llama3-8b-full.yaml", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert abs(plan["params_total"] / 8.03e9 - 1) < 0.005
    assert plan["params_trainable"] == plan["params_total"]
    assert plan["strategy"] in ("zero1", "zero2", "fsdp2", "zero3")
    assert plan["fits"] is True
    assert {"params", "grads", "optimizer", "activations", "logits", "overhead", "total"} <= plan["per_rank_bytes"].keys()
    assert plan["rejected"][0]["strategy"] == "ddp"
    assert plan["command"][1:4] == ["-m", "cluster.torchrun", "--nproc-per-node"]
    assert plan["command"][4] == "8"


def test_70b_on_one_node_exits_2_with_reasons_and_json_still_printed(capsys):
    assert main(["plan", "configs/llama3-70b-full.yaml", "--json"]) == 2
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is False and plan["suggestions"]
    assert main(["plan", "configs/llama3-70b-full.yaml", "--nodes", "4"]) == 0


def test_text_plan_shows_table_reason_and_command():
    result = run_ftl("plan", "configs/llama3-70b-full.yaml", "--gpus", "8", "--gpu-mem", "80GB", "train.micro_batch_size=2", env={"COLUMNS": "200"})
    assert result.returncode == 2
    out = result.stdout
    for word in ("parameters", "gradients", "optimizer", "activations", "logits", "overhead", "total",
                 "rejected ddp", "what would fit", "LoRA", "QLoRA", "more GPUs", "command", "micro-batch 2"):
        assert word in out, word


def test_gpus_flag_and_overrides_reach_the_command(capsys):
    assert main(["plan", "configs/quickstart.yaml", "--gpus", "1", "train.seq_len=64", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["world_size"] == 1 and plan["command"][4] == "1"


def test_plan_measure_prints_measured_beside_predicted(capsys):
    """`--measure` traces the 8B plan's step with fake tensors at world size 8 (seconds, no weights)."""
    code = main(["plan", "configs/llama3-8b-full.yaml", "strategy=fsdp2", "--json", "--measure"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0
    predicted = plan["per_rank_bytes"]["total"] - plan["per_rank_bytes"]["overhead"]
    assert abs(predicted / plan["measured_peak_bytes"] - 1) < 0.10


def test_plan_measure_refuses_deepspeed_plans_clearly(capsys):
    assert main(["plan", "configs/llama3-8b-full.yaml", "strategy=zero2", "--measure"]) == 2
    assert "cannot be traced" in capsys.readouterr().err


def test_plan_measure_traces_the_plans_own_method(capsys):
    """`--measure` traces the step of the plan's method, built by the code `ftl run` uses: LoRA and prompt
    tuning under fake tensors, QLoRA as a real 4-bit step. Their trainable state is not full fine-tuning's."""
    measured = {}
    for method in ("full", "lora", "qlora", "prompt_tuning"):
        assert main(["plan", "configs/quickstart.yaml", f"method.name={method}", "--json", "--measure"]) == 0
        plan = json.loads(capsys.readouterr().out)
        measured[method] = (plan["measured_trainable_state_bytes"], plan["measured_peak_bytes"])
    full_state = measured["full"][0]
    # full: fp32 params + two AdamW moments = 12 bytes per parameter, all of them trainable
    assert abs(full_state / (12 * 775_296) - 1) < 0.01
    for method in ("lora", "qlora", "prompt_tuning"):
        assert measured[method][0] < full_state / 4, measured
        assert measured[method][1] != measured["full"][1]
    assert measured["lora"][0] == measured["qlora"][0]  # the same adapters train; only the base differs
    assert measured["qlora"][1] < measured["lora"][1]  # a 4-bit base


def test_plan_measure_traces_classification_with_its_head(capsys):
    """A classifier's step has a num_labels head and no vocabulary logits: measured and predicted agree."""
    assert main(["plan", "configs/minilm-classify.yaml", "--json", "--measure"]) == 0
    plan = json.loads(capsys.readouterr().out)
    predicted = plan["per_rank_bytes"]["total"] - plan["per_rank_bytes"]["overhead"]
    assert abs(predicted / plan["measured_peak_bytes"] - 1) < 0.10, (predicted, plan["measured_peak_bytes"])


def _plan_text(config: str, *overrides: str, width: int = 100) -> tuple[object, str]:
    """The plan of `config` and the text `ftl plan` prints for it on a `width`-column terminal."""
    import io

    from rich.console import Console

    from launcher.cli import job_command, make_job_plan
    from launcher.report import print_plan

    spec = load_spec(Path(config), list(overrides))
    job_plan = make_job_plan(spec)
    out = io.StringIO()
    print_plan(Console(file=out, width=width, highlight=False, soft_wrap=True), job_plan, job_command(spec, job_plan))
    return job_plan, out.getvalue()


@pytest.mark.parametrize(
    "config,overrides",
    [("configs/quickstart.yaml", ()), ("configs/llama3-8b-full.yaml", ()), ("configs/llama3-70b-full.yaml", ()),
     ("configs/llama3-8b-full.yaml", ("strategy=zero3",))],  # a forced strategy adds a seventh column
    ids=["quickstart", "8b", "70b", "8b-forced-zero3"],
)
def test_plan_table_rows_add_up_to_the_total_and_fit_100_columns(config, overrides):
    from launcher.planner import estimate

    for width in (80, 100):  # 100 is asked for; 80, the width of a pipe, fits too
        job_plan, text = _plan_text(config, *overrides, width=width)
        for line in text.splitlines():  # only the command, which is copied into a shell, stays one long line
            assert len(line) <= width or line.startswith("command  "), line
        assert "…" not in text
    lines = text.splitlines()
    header = next(line for line in lines if "zero3_offload" in line)
    names = [n.rstrip("*") for n in header.split()]
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.split() and line.split()[0] in (
        "parameters", "gradients", "optimizer", "activations", "logits", "temporaries", "overhead", "total")}
    assert len(rows) == 8
    for i, name in enumerate(names):
        parts = sum(float(rows[label][i].replace(",", "")) for label in rows if label != "total")
        # each cell is rounded to 0.1, so the displayed parts may differ from the total by their rounding
        assert abs(parts - float(rows["total"][i].replace(",", ""))) <= 0.05 * 7 + 1e-9, (name, parts, rows["total"][i])
        memory = job_plan.per_rank if name == job_plan.strategy else estimate(job_plan.request, name).memory
        assert memory.at_peak.total + memory.overhead == memory.total  # exactly, in bytes


def test_plan_headline_says_does_not_fit_when_nothing_fits():
    job_plan, text = _plan_text("configs/llama3-70b-full.yaml")
    assert not job_plan.fits
    assert "does not fit with any strategy" in text
    assert "strategy fsdp2" not in text and "*" not in text  # no column is marked as if it would run
    job_plan, text = _plan_text("configs/llama3-8b-full.yaml")
    assert f"strategy {job_plan.strategy}:" in text and f"{job_plan.strategy}*" in text
    _, text = _plan_text("configs/llama3-70b-full.yaml", "strategy=fsdp2")
    assert "does not fit with the forced strategy fsdp2" in text
