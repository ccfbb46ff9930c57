"""The job spec: every mistake is one paragraph naming the field and the fix; precedence is CLI > YAML > default."""

from __future__ import annotations

import pytest

from launcher.cli import main
from launcher.errors import FTLError
from launcher.spec import load_spec
from tests.conftest import REPO, run_ftl, tiny_spec, write_spec

# (what to change in a valid spec, or raw YAML text; extra CLI overrides; words the error must contain)
BAD_SPECS = [
    ("top-level typo", {"trian": {"lr": 1}}, [], ["`trian`", "Did you mean `train`"]),
    ("nested typo", {"train": {"lrr": 1e-3}}, [], ["`train.lrr`", "Did you mean `train.lr`"]),
    ("negative lr", {"train": {"lr": -1e-3}}, [], ["`train.lr`", "greater than 0"]),
    ("zero gpus", {"hardware": {"gpus_per_node": 0}}, [], ["`hardware.gpus_per_node`", "greater than 0"]),
    ("missing data file", {"data": {"train": "nowhere/missing.jsonl"}}, [], ["`data.train`", "missing.jsonl", "does not exist"]),
    ("wrong type", {"train": {"max_steps": "many"}}, [], ["`train.max_steps`", "'many'"]),
    ("bad strategy", {"strategy": "zero4"}, [], ["`strategy`", "zero4"]),
    ("bad device", {"hardware": {"device": "tpu"}}, [], ["`hardware.device`", "tpu"]),
    ("bad gpu_mem", {"hardware": {"gpu_mem": "lots"}}, [], ["`hardware.gpu_mem`"]),
    ("warmup too long", {}, ["train.warmup_steps=50"], ["`train.warmup_steps`", "smaller than `train.max_steps`"]),
    ("no model_type", {"model": {"config": {"hidden_size": 8}}}, [], ["`model`", "model_type"]),
    ("two model sources", {"model": {"name_or_path": "x"}}, [], ["exactly one of `model.name_or_path`"]),
    ("missing lr", None, [], ["`train.lr` is required"]),
    ("bad override form", {}, ["train.lr"], ["Override 'train.lr'", "key.sub=value"]),
    ("override unknown key", {}, ["train.lrate=1"], ["`train.lrate`", "Did you mean `train.lr`"]),
    ("override into a value", {}, ["train.lr.x=1"], ["`lr` holds a value"]),
    ("bad data suffix", {"data": {"train": str(REPO / "README.md")}}, [], ["`data.train`", ".md"]),
]


@pytest.mark.parametrize("change,overrides,words", [case[1:] for case in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_is_one_paragraph_naming_the_field(tmp_path, change, overrides, words):
    spec = tiny_spec(tmp_path)
    if change is None:
        del spec["train"]["lr"]
    else:
        for key, value in change.items():
            spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    with pytest.raises(FTLError) as err:
        load_spec(write_spec(tmp_path, spec), overrides)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(FTLError, match="broken.yaml.*not valid YAML"):
        load_spec(path)


def test_cli_prints_error_without_traceback_and_exits_2(tmp_path):
    spec = tiny_spec(tmp_path, train={"lr": -1})
    result = run_ftl("plan", str(write_spec(tmp_path, spec)))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "`train.lr`" in result.stderr


def test_missing_job_file(capsys):
    assert main(["plan", "no/such/job.yaml"]) == 2
    assert "no/such/job.yaml" in capsys.readouterr().err


def test_precedence_cli_over_yaml_over_default(tmp_path):
    spec = tiny_spec(tmp_path, train={"lr": 1e-3, "seed": 7})
    path = write_spec(tmp_path, spec)
    loaded = load_spec(path, ["train.lr=5e-4"])
    assert loaded.train.lr == 5e-4  # CLI beats YAML
    assert loaded.train.seed == 7  # YAML beats default
    assert loaded.train.grad_accum == 1  # default
    assert load_spec(path, ["hardware.gpu_mem=24GiB"]).hardware.gpu_mem == 24 * 2**30


def test_spec_is_frozen(tmp_path):
    loaded = load_spec(write_spec(tmp_path, tiny_spec(tmp_path)))
    with pytest.raises(Exception):
        loaded.train.lr = 1.0


def test_schema_documents_every_field(capsys):
    import json

    assert main(["spec", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    train = schema["$defs"]["TrainSpec"]["properties"]
    assert all(field.get("description") for field in train.values())
