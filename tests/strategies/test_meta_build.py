"""FSDP2 builds every method and task on the meta device and fills each rank's shards from the folder
(launcher/weights.py), so no rank holds the whole model. The sharded model, gathered, must be the model a
plain build from the same folder holds: the same base weights bit for bit, the same 4-bit weights once
dequantised, LoRA B at zero (step 0 is the base model), the prompt taken from the same embeddings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster.local import job_env
from tests.conftest import REPO, tiny_spec

TOPICS = {"train": str(REPO / "configs/data/topics.jsonl")}
CASES = {
    "lora": dict(method={"name": "lora", "lora": {"r": 4}}),
    "qlora": dict(method={"name": "qlora", "lora": {"r": 4}}),
    # Shards in host memory; 4-bit constants stay on the compute device (here both are the CPU).
    "qlora-offload": dict(method={"name": "qlora", "lora": {"r": 4}}, strategy="fsdp2_offload"),
    "prompt-text": dict(method={"name": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 8, "init": "text", "init_text": "Ada has"}}),
    "classify-full": dict(task={"name": "classification", "num_labels": 4}, data=TOPICS),
    "classify-lora": dict(task={"name": "classification", "num_labels": 4}, data=TOPICS, method={"name": "lora", "lora": {"r": 4}}),
}


def in_folder(name: str, folder: dict) -> bool:
    """Whether a (PEFT-wrapped) model parameter comes from the folder: its name there has neither PEFT's
    wrapper prefix nor its inserted components."""
    from launcher.weights import checkpoint_key

    key = checkpoint_key(name)
    return any(key.removeprefix(prefix) in folder for prefix in ("base_model.model.", "base_model.", ""))


def build_on_two_ranks(tmp_path: Path, spec_dict: dict, host: str, *args: str) -> Path:
    from launcher.cli import make_job_plan
    from launcher.job import prepare_run_dir
    from launcher.spec import spec_from_dict

    spec = spec_from_dict(spec_dict)
    prepare_run_dir(spec, make_job_plan(spec), fresh=True, say=lambda _: None)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", host, str(spec.output_dir), *args, str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=job_env("cpu", dict(os.environ)))
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_build_equals_plain_build(tmp_path: Path, tiny_model_dir: Path, name: str) -> None:
    from launcher.modeling import build_model
    from launcher.spec import spec_from_dict
    case = {"strategy": "fsdp2", **CASES[name]}
    spec_dict = tiny_spec(tmp_path, model={"name_or_path": str(tiny_model_dir), "init": "pretrained"}, hardware={"gpus_per_node": 2}, **case)
    spec_dict["model"].pop("config")
    gathered = load_file(build_on_two_ranks(tmp_path, spec_dict, "tests.hosts.build_rank"))

    spec = spec_from_dict(spec_dict)
    labels = ["food", "sports", "technology", "weather"] if "task" in CASES[name] else None
    torch.manual_seed(0)
    plain = build_model(spec, label_names=labels, pad_token_id=0, strategy=spec.strategy)
    if spec.method.name == "prompt_tuning":  # as the train entry does after a plain build
        from launcher.data import build_tokenizer
        from launcher.methods import init_prompt_from_text

        init_prompt_from_text(plain, build_tokenizer(spec)(spec.method.prompt_tuning.init_text, add_special_tokens=False)["input_ids"])
    folder = load_file(tiny_model_dir / "model.safetensors")

    compared = 0
    for key, param in plain.named_parameters():
        ours = gathered[key]
        if type(param).__name__ == "Params4bit":
            import bitsandbytes.functional as bnbf

            expected = bnbf.dequantize_4bit(param.data, param.quant_state)
            assert torch.equal(gathered[key.removesuffix(".weight") + ".dequantized"], expected), key
        elif "lora_B" in key:
            assert not ours.any(), f"{key} must start at zero"
        elif "lora_A" in key:
            assert ours.abs().sum() > 0, key
        elif in_folder(key, folder) or "prompt_encoder" in key:
            assert torch.equal(ours, param.detach()), key
        else:  # the new classification head: initialised, not left as allocated garbage
            assert ".score." in f".{key}", key
            assert torch.isfinite(ours).all() and 0 < ours.float().std() < 0.1, key
        compared += 1
    assert compared == len(dict(plain.named_parameters()))
    if "classify-lora" == name:
        assert torch.equal(gathered["base_model.model.score.original_module.weight"], gathered["base_model.model.score.modules_to_save.default.weight"])
