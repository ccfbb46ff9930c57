"""The spec at its edges, as a new user meets them: sizes need a unit, unknown keys are answered by meaning,
relative paths start at the spec's folder, an override of one source replaces the other, a warmup that does
not fit a short run is clamped with a notice."""

from __future__ import annotations

import pytest

from launcher.cli import main
from launcher.errors import FTLError
from launcher.spec import load_spec
from tests.conftest import REPO, tiny_spec, write_spec

QUICKSTART = str(REPO / "configs/quickstart.yaml")


def _error(tmp_path, overrides: list[str], **sections) -> str:
    with pytest.raises(FTLError) as err:
        load_spec(write_spec(tmp_path, tiny_spec(tmp_path, **sections)), overrides)
    assert "\n" not in str(err.value)
    return str(err.value)


# -- sizes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["hardware.gpu_mem=80", "hardware.gpu_mem=80.5", "hardware.cpu_mem=512"])
def test_a_size_without_a_unit_is_refused_with_the_fix(tmp_path, override):
    field, _, number = override.partition("=")
    message = _error(tmp_path, [override])
    assert f"`{field}`" in message and f"`{number}GB`" in message and f"`{number}GiB`" in message


def test_gpu_mem_flag_without_a_unit_names_the_flag(capsys):
    assert main(["plan", QUICKSTART, "--gpu-mem", "80"]) == 2
    err = capsys.readouterr().err
    assert "`hardware.gpu_mem`" in err and "`--gpu-mem 80GB`" in err


@pytest.mark.parametrize("text,size", [("80GB", 80 * 10**9), ("24GiB", 24 * 2**30), ("512MiB", 2**29), ("1.5TB", 15 * 10**11), ("80 gb", 80 * 10**9)])
def test_sizes_with_units(tmp_path, text, size):
    assert load_spec(write_spec(tmp_path, tiny_spec(tmp_path)), [f"hardware.gpu_mem={text}"]).hardware.gpu_mem == size


def test_sizes_round_trip_through_the_run_dirs_spec(tmp_path):
    """The run dir's spec.yaml is read back by every rank: sizes are written with a unit, exactly."""
    spec = load_spec(write_spec(tmp_path, tiny_spec(tmp_path)), ["hardware.gpu_mem=24GiB", "hardware.cpu_mem=1234567B"])
    (tmp_path / "again.yaml").write_text(spec.to_yaml())
    again = load_spec(tmp_path / "again.yaml")
    assert (again.hardware.gpu_mem, again.hardware.cpu_mem) == (24 * 2**30, 1234567)
    assert "gpu_mem: 24GiB" in spec.to_yaml()


# -- unknown keys: by meaning, then by place, then by spelling -------------------------------------------
@pytest.mark.parametrize(
    "override,meant",
    [
        ("train.learning_rate=1e-4", "train.lr"),
        ("learning_rate=1e-4", "train.lr"),
        ("train.lr_scheduler=cosine", "train.warmup_steps"),
        ("train.warmup=10", "train.warmup_steps"),
        ("train.batch_size=4", "train.micro_batch_size"),
        ("train.per_device_train_batch_size=4", "train.micro_batch_size"),
        ("train.gradient_accumulation_steps=4", "train.grad_accum"),
        ("train.num_train_epochs=3", "train.max_steps"),
        ("train.max_seq_length=256", "train.seq_len"),
        ("train.cutoff_len=256", "train.seq_len"),
        ("model.model_name_or_path=x", "model.name_or_path"),
        ("base_model=x", "model.name_or_path"),
        ("method.lora_r=8", "method.lora.r"),
        ("weight_decay=0.1", "train.weight_decay"),  # a real field, in the wrong section
        ("train.lrr=1", "train.lr"),  # spelling
    ],
)
def test_unknown_key_suggests_the_field_meant(tmp_path, override, meant):
    key = override.partition("=")[0]
    message = _error(tmp_path, [override])
    assert f"`{key}` is not a known key" in message
    assert f"Did you mean `{meant}`?" in message
    assert "early_stopping" not in message.split("Did you mean")[1]


def test_epochs_are_converted_to_steps_with_the_jobs_numbers(tmp_path):
    message = _error(tmp_path, ["train.epochs=3", "train.micro_batch_size=8", "train.grad_accum=2", "hardware.gpus_per_node=2"])
    assert "Did you mean `train.max_steps`?" in message
    assert "epochs × rows / (micro_batch_size × grad_accum × ranks)" in message
    assert "3 × rows / (8 × 2 × 2) = 3 × rows / 32" in message


def test_a_setting_ftl_does_not_have_says_what_it_does_instead(tmp_path):
    message = _error(tmp_path, ["resume_from_checkpoint=true"])
    assert "FTL has no `resume_from_checkpoint`" in message and "--no-resume" in message
