"""`ftl spec` as a user reads it: every field with its type, default and meaning; `--schema` the JSON."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

import launcher.cli
from launcher.cli import main
from launcher.report import spec_fields
from launcher.spec import JobSpec


def _terminal(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    monkeypatch.setattr(launcher.cli, "console", Console(width=width, highlight=False, soft_wrap=True))


def test_spec_lists_every_field_with_type_default_and_meaning(capsys, monkeypatch):
    _terminal(monkeypatch, 120)
    assert main(["spec"]) == 0
    out = capsys.readouterr().out
    fields = spec_fields(JobSpec)
    assert len(fields) > 80
    for f in fields:
        assert f.meaning, f"{f.path} has no docstring"  # the list is only as good as the docstrings
        assert f.path in out
    lines = out.splitlines()
    assert "train.lr  float  (required)" in lines
    assert "train.seq_len  int  = 512" in lines
    assert "hardware.gpu_mem  size  = 80GB" in lines
    assert "strategy  auto | ddp | zero1 | zero2 | fsdp2 | zero3 | zero3_offload | fsdp2_offload  = auto" in lines
    assert "data.mixture.<i>.weight  float  = 1.0" in lines
    assert "method.lora.target_modules  str | list[str]  = all-linear" in lines
    meaning = lines[lines.index("train.lr  float  (required)") + 1]
    assert meaning.startswith("    Peak learning rate")
    # grouped: each section's fields follow its heading, and the sections come in the spec's order
    heads = [line.split()[0] for before, line in zip(lines, lines[1:]) if not before and line]
    assert heads == list(JobSpec.model_fields)


def test_spec_fits_the_terminal(capsys, monkeypatch):
    _terminal(monkeypatch, 72)
    assert main(["spec"]) == 0
    widest = max(len(line) for line in capsys.readouterr().out.splitlines())
    assert widest <= 72


def test_spec_schema_keeps_the_json_schema(capsys):
    assert main(["spec", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == JobSpec.model_json_schema()
    assert "Peak learning rate" in schema["$defs"]["TrainSpec"]["properties"]["lr"]["description"]
