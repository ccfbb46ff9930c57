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


def test_a_bare_byte_count_is_still_read(tmp_path):
    """Run dirs written before units were required hold bytes as a bare integer: they still resume and export."""
    spec = tiny_spec(tmp_path, hardware={"gpu_mem": 8 * 10**9, "cpu_mem": 10**12})
    loaded = load_spec(write_spec(tmp_path, spec))
    assert (loaded.hardware.gpu_mem, loaded.hardware.cpu_mem) == (8 * 10**9, 10**12)


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


# -- relative paths ------------------------------------------------------------------------------------
def _job_folder(tmp_path):
    """A job folder elsewhere: job.yaml beside its data and a local model folder, all named relatively."""
    import shutil

    folder = tmp_path / "jobs" / "mine"
    (folder / "data").mkdir(parents=True)
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text('{"model_type": "llama"}')
    for name in ("quickstart.jsonl", "quickstart-val.jsonl"):
        shutil.copy(REPO / "configs/data" / name, folder / "data" / name)
    return folder


def test_relative_input_paths_start_at_the_spec_folder_outputs_at_the_current_directory(tmp_path, monkeypatch):
    folder = _job_folder(tmp_path)
    spec = tiny_spec(
        tmp_path,
        model={"name_or_path": "model", "config": None},
        data={"train": None, "phases": [{"name": "a", "steps": 10, "mixture": [{"path": "data/quickstart.jsonl"}]}],
              "eval_sets": [{"name": "v", "path": "./data/quickstart-val.jsonl"}], "validation": "data/quickstart-val.jsonl",
              "cache_dir": "cache"},
        output_dir="runs/mine",
    )
    del spec["model"]["config"], spec["data"]["train"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_spec(write_spec(folder, spec))
    assert loaded.model.name_or_path == str(folder / "model")
    assert loaded.data.phases[0].mixture[0].path == folder / "data/quickstart.jsonl"
    assert loaded.data.eval_sets[0].path == folder / "data/quickstart-val.jsonl"
    assert loaded.data.validation == folder / "data/quickstart-val.jsonl"
    assert loaded.output_dir == elsewhere / "runs/mine"  # written: where the command runs
    assert loaded.data.cache_dir == elsewhere / "cache"


def test_paths_on_the_command_line_start_at_the_current_directory(tmp_path, monkeypatch):
    folder = _job_folder(tmp_path)
    monkeypatch.chdir(folder / "data")
    loaded = load_spec(write_spec(folder, tiny_spec(tmp_path)), ["data.train=quickstart-val.jsonl"])
    assert loaded.data.train == folder / "data/quickstart-val.jsonl"
    message = str(pytest.raises(FTLError, load_spec, write_spec(folder, tiny_spec(tmp_path)), ["data.train=nope.jsonl"]).value)
    assert "`data.train`" in message and "current directory" in message and str(folder / "data") in message


def test_a_missing_relative_file_is_named_at_the_spec_folder(tmp_path):
    folder = _job_folder(tmp_path)
    message = str(pytest.raises(FTLError, load_spec, write_spec(folder, tiny_spec(tmp_path, data={"train": "data/nope.jsonl"}))).value)
    assert "`data.train`" in message and str(folder / "data/nope.jsonl") in message


def test_the_run_dirs_spec_holds_every_path_absolute(tmp_path, monkeypatch):
    folder = _job_folder(tmp_path)
    spec = tiny_spec(tmp_path, model={"name_or_path": "model"}, data={"train": "data/quickstart.jsonl", "cache_dir": "c"})
    del spec["model"]["config"]
    loaded = load_spec(write_spec(folder, spec))
    (tmp_path / "spec.yaml").write_text(loaded.to_yaml())
    monkeypatch.chdir(tmp_path / "jobs")
    assert load_spec(tmp_path / "spec.yaml") == loaded


def test_every_path_field_is_either_read_or_written():
    """READ_PATHS / WRITTEN_PATHS is the registry of where relative paths start: a new path field must join one."""
    import typing
    from pathlib import Path

    from launcher.spec import JobSpec
    from launcher.spec_errors import all_field_paths
    from launcher.spec_load import READ_PATHS, WRITTEN_PATHS

    def annotation(path: str):
        from launcher.spec_errors import _section_model

        model = JobSpec
        *sections, name = path.split(".")
        for part in sections:
            model = _section_model(model.model_fields[part].annotation)
        return model.model_fields[name].annotation

    def is_path(ann) -> bool:
        return ann is Path or any(is_path(a) for a in typing.get_args(ann))

    path_fields = {p for p in all_field_paths(JobSpec) if is_path(annotation(p))}
    listed = {p.replace(".*", "") for p in (*READ_PATHS, *WRITTEN_PATHS)}
    assert path_fields <= listed, f"path fields missing from READ_PATHS/WRITTEN_PATHS: {path_fields - listed}"
    assert {"model.name_or_path", "data.tokenizer"} <= listed  # folders given as strings


def test_readme_configs_plan_from_another_directory(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.chdir(tmp_path)
    assert main(["plan", QUICKSTART, "--json"]) == 0
    command = json.loads(capsys.readouterr().out)["command"]
    assert command[command.index("--run-dir") + 1] == str(tmp_path / "runs/quickstart")
    for name in ("multitask", "continual", "chat", "minilm-classify"):
        assert load_spec(REPO / f"configs/{name}.yaml").output_dir == tmp_path / f"runs/{name}"


# -- one source replaces the other ---------------------------------------------------------------------
def test_an_override_of_one_model_source_replaces_the_other(tmp_path):
    folder = _job_folder(tmp_path)
    loaded = load_spec(QUICKSTART, [f"model.name_or_path={folder / 'model'}"])
    assert loaded.model.config is None and loaded.model.name_or_path == str(folder / "model")
    spec = tiny_spec(tmp_path, model={"name_or_path": "model"})
    del spec["model"]["config"]
    loaded = load_spec(write_spec(folder, spec), ["model.config={model_type: llama, hidden_size: 64}"])
    assert loaded.model.name_or_path is None and loaded.model.config["hidden_size"] == 64


def test_an_override_of_one_data_source_replaces_the_others():
    loaded = load_spec(REPO / "configs/multitask.yaml", ["data.train=configs/data/quickstart.jsonl"])
    assert loaded.data.mixture is None and loaded.data.train == REPO / "configs/data/quickstart.jsonl"


def test_a_spec_file_giving_both_sources_is_still_a_mistake(tmp_path):
    folder = _job_folder(tmp_path)
    message = str(pytest.raises(FTLError, load_spec, write_spec(folder, tiny_spec(tmp_path, model={"name_or_path": "model"}))).value)
    assert "exactly one of `model.name_or_path`" in message


# -- warmup ---------------------------------------------------------------------------------------------
def test_a_warmup_that_does_not_fit_a_short_run_is_clamped_with_a_notice():
    from launcher.spec import read_spec

    loaded = read_spec(QUICKSTART, ["train.max_steps=20"])
    assert loaded.spec.train.warmup_steps == 2  # a tenth of the run
    assert len(loaded.notices) == 1 and "`train.warmup_steps` (30)" in loaded.notices[0] and "clamped to 2" in loaded.notices[0]
    assert read_spec(QUICKSTART, ["train.max_steps=5"]).spec.train.warmup_steps == 0
    assert read_spec(QUICKSTART, ["train.max_steps=31"]).notices == ()  # it fits: untouched


def test_a_warmup_given_on_the_command_line_is_taken_as_meant():
    with pytest.raises(FTLError, match="`train.warmup_steps` \\(30\\) must be smaller than `train.max_steps` \\(20\\)"):
        load_spec(QUICKSTART, ["train.max_steps=20", "train.warmup_steps=30"])


def test_the_cli_prints_the_notice_on_stderr(capsys):
    import json

    assert main(["plan", QUICKSTART, "train.max_steps=20", "--json"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)  # stdout stays one JSON object
    assert "note:" in err and "clamped to 2" in err


# -- every method of the README's table on the quickstart (a tied head) ----------------------------------
def _trainable(overrides: list[str]) -> set[str]:
    from launcher.modeling import build_model

    model = build_model(load_spec(QUICKSTART, overrides), meta=True)
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_feature_extraction_on_a_tied_head_trains_the_shared_matrix():
    """The quickstart ties lm_head to embed_tokens: training the head is training that one tensor."""
    assert _trainable(["method.name=freeze"]) == {"model.embed_tokens.weight"}


def test_freezing_n_blocks_keeps_a_tied_head_frozen_with_the_embeddings():
    trainable = _trainable(["method.name=freeze", "method.freeze.blocks=2"])
    assert "model.embed_tokens.weight" not in trainable
    assert {n.split(".")[2] for n in trainable if n.startswith("model.layers.")} == {"2", "3"}
    assert "model.norm.weight" in trainable
    with_embeddings = _trainable(["method.name=freeze", "method.freeze.blocks=2", "method.freeze.embeddings=false"])
    assert with_embeddings == trainable | {"model.embed_tokens.weight"}


def test_gradual_unfreezing_starts_from_the_tied_head():
    from launcher.methods import unfreeze_top_blocks
    from launcher.model_info import transformer_blocks
    from launcher.modeling import build_model

    model = build_model(load_spec(QUICKSTART, ["method.name=gradual_unfreezing", "method.gradual_unfreezing.every_steps=50"]), meta=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"model.embed_tokens.weight"}
    unfreeze_top_blocks(transformer_blocks(model), 1)
    assert any(n.startswith("model.layers.3.") for n, p in model.named_parameters() if p.requires_grad)


def test_gradual_unfreezing_without_its_required_key_names_it():
    with pytest.raises(FTLError, match="needs `method.gradual_unfreezing.every_steps`"):
        load_spec(QUICKSTART, ["method.name=gradual_unfreezing"])


@pytest.mark.parametrize(
    "extra", [["method.name=full"], ["method.name=lora"], ["method.name=qlora"], ["method.name=prompt_tuning"], ["method.name=freeze"],
              ["method.name=gradual_unfreezing", "method.gradual_unfreezing.every_steps=50"]],
)
def test_every_method_plans_on_the_quickstart_with_only_its_name(extra, capsys):
    assert main(["plan", QUICKSTART, "--json", *extra]) == 0, capsys.readouterr().err
