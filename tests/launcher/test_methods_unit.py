"""Methods without a launch: pre-load checks, trainable counts in the plan, task data, and the
bitsandbytes CPU trap (real 4-bit layers, in this process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.data import build_tokenizer, few_shot_rows, load_examples, open_sources
from launcher.errors import FTLError
from launcher.methods import eval_mode, first_step_gradient_problem
from launcher.modeling import build_model
from launcher.spec import spec_from_dict
from tests.conftest import REPO, TINY_LLAMA, run_ftl, tiny_spec, write_spec

TOPICS = {"train": str(REPO / "configs/data/topics.jsonl"), "validation": str(REPO / "configs/data/topics-val.jsonl")}


@pytest.mark.parametrize(
    "sections, expected",
    [
        (dict(method={"name": "qlora"}, strategy="zero3"), "`method.name: qlora` with `strategy: zero3` is refused"),
        (dict(method={"name": "lora", "lora": {"target_modules": ["qq_proj"]}}), "match no module"),
        (dict(task={"name": "classification", "num_labels": 1}), "at least 2 classes"),
        (dict(method={"name": "gradual_unfreezing", "gradual_unfreezing": {"every_steps": 5}}, task={"name": "classification", "num_labels": 2}), "longer than the run"),
        (dict(method={"name": "freeze", "lora": {"r": 4}}), "`method.lora` is given but `method.name` is 'freeze'"),
        (dict(method={"name": "prompt_tuning", "prompt_tuning": {"init": "text"}}), "needs `init_text`"),
        (dict(method={"name": "freeze", "freeze": {"blocks": 9}}), "`method.freeze.blocks` is 9 but the model has 2 blocks"),
        (dict(method={"name": "lora", "lora": {"rr": 4}}), "Did you mean `method.lora.r`?"),
    ],
)
def test_bad_method_choices_fail_before_loading_with_one_paragraph(tmp_path: Path, sections: dict, expected: str) -> None:
    result = run_ftl("plan", str(write_spec(tmp_path, tiny_spec(tmp_path, **sections))))
    assert result.returncode == 2
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_plan_counts_what_each_method_trains(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from launcher.model_info import build_config

    def planned(**sections) -> dict:
        result = run_ftl("plan", str(write_spec(tmp_path, tiny_spec(tmp_path, **sections))), "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    full, lora, qlora = planned(), planned(method={"name": "lora", "lora": {"r": 8}}), planned(method={"name": "qlora", "lora": {"r": 8}})
    reference = get_peft_model(
        AutoModelForCausalLM.from_config(build_config(spec_from_dict(tiny_spec(tmp_path)).model)), LoraConfig(r=8, target_modules="all-linear")
    )
    assert lora["params_trainable"] == sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert full["params_trainable"] == full["params_total"]
    assert qlora["params_trainable"] == lora["params_trainable"]
    # 4-bit block weights: the frozen base costs less than a dense one.
    assert qlora["per_rank_bytes"]["params"] < lora["per_rank_bytes"]["params"]
    prompt = planned(method={"name": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 10}})
    assert prompt["params_trainable"] == 10 * 64


def test_completion_only_loss_masks_the_prompt(tmp_path: Path) -> None:
    spec = spec_from_dict(
        tiny_spec(tmp_path, task={"name": "causal_lm", "completion_only_loss": True}, data={"train": str(REPO / "configs/data/completions.jsonl")})
    )
    tokenizer = build_tokenizer(spec)
    examples, _ = load_examples(spec, tokenizer, spec.data.train)
    first = examples["labels"][0]
    prompt_len = len(tokenizer("Q: what is 0 plus 1? A:", add_special_tokens=False)["input_ids"])
    assert (first[:prompt_len] == -100).all()
    kept = first[first != -100].tolist()
    assert tokenizer.decode(kept) == " 1.</s>"


def test_classification_labels_are_checked_against_num_labels(tmp_path: Path) -> None:
    spec = spec_from_dict(tiny_spec(tmp_path, task={"name": "classification", "num_labels": 3}, data=TOPICS))
    with pytest.raises(FTLError, match="has 4 classes .* Set task.num_labels to 4"):
        load_examples(spec, build_tokenizer(spec), spec.data.train)
    spec = spec_from_dict(tiny_spec(tmp_path, task={"name": "classification", "num_labels": 4}, data={**TOPICS, "few_shot": 5}))
    examples, names = load_examples(spec, build_tokenizer(spec), spec.data.train)
    assert names == ["food", "sports", "technology", "weather"]
    (source,) = open_sources(spec, build_tokenizer(spec), spec.data.sources)
    rows = few_shot_rows(spec, source, 5, seed=0)
    assert rows == few_shot_rows(spec, source, 5, seed=0)  # reproducible
    picked = [str(source.rows[i]["label"]) for i in rows]
    assert sorted(picked) == sorted(names * 5)  # exactly k of each class
    with pytest.raises(FTLError, match="class 'food' .* has 200 examples"):
        few_shot_rows(spec, source, 201, seed=0)


def _qlora_model(tmp_path: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    # bitsandbytes' CPU repack needs every Linear's out_features divisible by 32.
    config = {**TINY_LLAMA, "intermediate_size": 128}
    model = build_model(spec_from_dict(tiny_spec(tmp_path, model={"config": config}, method={"name": "qlora", "lora": {"r": 4}})))
    batch = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    return model, batch


def _lora_b_grads(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    model(input_ids=batch, labels=batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_B" in n and p.grad is not None}


def test_qlora_cpu_repack_trap_is_detected(tmp_path: Path) -> None:
    model, batch = _qlora_model(tmp_path)
    import bitsandbytes as bnb

    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "QLoRA built no 4-bit layers"
    if not getattr(four_bit[0], "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here, so the trap cannot occur")
    model.eval()
    with torch.no_grad():
        model(input_ids=batch)  # the trap: an eval-mode forward without gradients before training
    model.train()
    _lora_b_grads(model, batch)
    assert "repacked" in first_step_gradient_problem(model)


def test_ftl_validation_does_not_spring_the_trap(tmp_path: Path) -> None:
    reference_model, batch = _qlora_model(tmp_path)
    reference = _lora_b_grads(reference_model, batch)
    model, _ = _qlora_model(tmp_path)
    with torch.no_grad(), eval_mode(model):
        model(input_ids=batch)
    grads = _lora_b_grads(model, batch)
    assert first_step_gradient_problem(model) == ""
    assert grads.keys() == reference.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name])
