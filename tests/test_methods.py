"""Every fine-tuning method as a real 2-process run on CPU, then exported and reloaded with
transformers/PEFT: the export must reproduce the validation loss the trained model logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TINY_LLAMA, run_ftl, tiny_spec, write_spec

TOPICS = {"train": str(REPO / "configs/data/topics.jsonl"), "validation": str(REPO / "configs/data/topics-val.jsonl")}
LM_VAL = {"validation": str(REPO / "configs/data/quickstart-val.jsonl")}
CLASSIFY_TRAIN = {"max_steps": 100, "lr": 3e-3, "body_lr_ratio": 1.0, "micro_batch_size": 8, "log_every": 10, "seq_len": 80}
UNTIED = {"config": {**TINY_LLAMA, "tie_word_embeddings": False}}

CASES = {
    "lora-ddp": dict(method={"name": "lora", "lora": {"r": 8}}, data=LM_VAL, strategy="ddp"),
    "lora-fsdp2": dict(method={"name": "lora", "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}, data=LM_VAL, strategy="fsdp2"),
    "qlora-fsdp2": dict(method={"name": "qlora", "lora": {"r": 8}}, data=LM_VAL, strategy="fsdp2"),
    "qlora-fsdp2-offload": dict(method={"name": "qlora", "lora": {"r": 8}}, data=LM_VAL, strategy="fsdp2_offload"),
    "qlora-zero2": dict(method={"name": "qlora", "lora": {"r": 8}}, data=LM_VAL, strategy="zero2"),
    "prompt-text": dict(
        method={"name": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 8, "init": "text", "init_text": "Ada has"}},
        data=LM_VAL,
        strategy="ddp",
    ),
    "freeze-1-block": dict(method={"name": "freeze", "freeze": {"blocks": 1}}, model=UNTIED, data=LM_VAL, strategy="ddp"),
    # A byte-level model learning words from scratch needs more steps than the LM cases.
    "classify-full": dict(task={"name": "classification", "num_labels": 4}, data=TOPICS, strategy="ddp", train=CLASSIFY_TRAIN),
    "classify-feature-extraction": dict(
        method={"name": "freeze", "freeze": {"blocks": "all"}},
        task={"name": "classification", "num_labels": 4},
        data=TOPICS,
        strategy="ddp",
        train=CLASSIFY_TRAIN,
    ),
}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_case(tmp_path: Path, name: str, **extra) -> tuple[dict, Path]:
    case = dict(CASES[name])
    strategy = case.pop("strategy")
    train = {"max_steps": 24, "lr": 3e-3, "warmup_steps": 2, "log_every": 4, "micro_batch_size": 4, "seq_len": 64, **case.pop("train", {})}
    spec = tiny_spec(
        tmp_path,
        train=train,
        hardware={"gpus_per_node": 2},
        checkpoint={"every": 0},
        strategy=strategy,
        **case,
        **extra,
    )
    result = run_ftl("run", str(write_spec(tmp_path, spec)), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return spec, Path(spec["output_dir"])


@pytest.mark.parametrize("name", list(CASES))
def test_method_trains_exports_and_reloads(tmp_path: Path, name: str) -> None:
    spec, run_dir = run_case(tmp_path, name)
    logged = records(run_dir)
    losses = [r["loss"] for r in logged if "loss" in r]
    assert sum(losses[-2:]) < sum(losses[:2]), f"{name}: loss did not go down: {losses}"
    final_val = [r for r in logged if "val_loss" in r][-1]

    out = tmp_path / "export"
    result = run_ftl("export", str(run_dir), "--to", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_export(out, spec)
    if name.startswith("qlora"):
        return  # trained over a 4-bit base, reloaded over the dense one: same adapters, other base numerics
    val = validation_metrics(model, spec)
    assert val["val_loss"] == pytest.approx(final_val["val_loss"], rel=1e-4)
    if "accuracy" in final_val:
        assert val["accuracy"] == pytest.approx(final_val["accuracy"])
    if name == "lora-ddp":  # --merge: the adapters folded into the base, written as a whole model
        merged = tmp_path / "merged"
        result = run_ftl("export", str(run_dir), "--to", str(merged), "--merge")
        assert result.returncode == 0, result.stderr[-3000:]
        assert not (merged / "adapter_config.json").exists()
        merged_val = validation_metrics(load_export(merged, spec), spec)
        assert merged_val["val_loss"] == pytest.approx(final_val["val_loss"], rel=1e-4)


def load_export(out: Path, spec: dict) -> torch.nn.Module:
    """Load with the libraries a user would use, not with FTL."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if "task" in spec else AutoModelForCausalLM
    if (out / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        peft_cls = AutoPeftModelForSequenceClassification if "task" in spec else AutoPeftModelForCausalLM
        return peft_cls.from_pretrained(out, local_files_only=True).eval()
    return cls.from_pretrained(out, local_files_only=True).eval()


@torch.no_grad()
def validation_metrics(model: torch.nn.Module, spec: dict) -> dict:
    """Loss (and accuracy) over the whole validation file, as the run's evaluation computes it."""
    from launcher.data import build_tokenizer, load_examples
    from launcher.spec import spec_from_dict

    job = spec_from_dict(spec)
    tokenizer = build_tokenizer(job)
    _, names = load_examples(job, tokenizer, job.data.train)
    examples, _ = load_examples(job, tokenizer, job.data.validation, names)
    out = model(**examples)
    metrics = {"val_loss": out.loss.item()}
    if "task" in spec:
        metrics["accuracy"] = (out.logits.argmax(-1) == examples["labels"]).float().mean().item()
    return metrics


@pytest.mark.parametrize("strategy", ["fsdp2", "zero2"])
def test_lora_under_sharding_saves_nonempty_trained_adapters(tmp_path: Path, strategy: str) -> None:
    """A known failure elsewhere: sharded LoRA runs that save empty or untrained adapters."""
    spec, run_dir = _lora_run(tmp_path, strategy)
    out = tmp_path / "export"
    assert run_ftl("export", str(run_dir), "--to", str(out)).returncode == 0
    saved = load_file(out / "adapter_model.safetensors")
    lora = {k: v for k, v in saved.items() if "lora_" in k}
    assert len(lora) == 2 * 7 * TINY_LLAMA["num_hidden_layers"]  # A and B on all 7 Linears of each block
    assert all(t.numel() > 0 for t in lora.values())

    initial = initial_adapters(spec)
    for key, tensor in lora.items():
        assert not torch.equal(tensor, initial[key]), f"{key} was saved unchanged from its initial value"


def _lora_run(tmp_path: Path, strategy: str) -> tuple[dict, Path]:
    spec = tiny_spec(
        tmp_path,
        method={"name": "lora", "lora": {"r": 4}},
        train={"max_steps": 6, "lr": 3e-3, "micro_batch_size": 2},
        hardware={"gpus_per_node": 2},
        strategy=strategy,
    )
    result = run_ftl("run", str(write_spec(tmp_path, spec)), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return spec, Path(spec["output_dir"])


def initial_adapters(spec: dict) -> dict[str, torch.Tensor]:
    """The adapters as the run initialised them (same seed, same build), keyed as PEFT saves them."""
    from peft import get_peft_model_state_dict

    from launcher.modeling import build_model
    from launcher.spec import spec_from_dict

    torch.manual_seed(spec["train"].get("seed", 0))
    model = build_model(spec_from_dict(spec))
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def test_gradual_unfreezing_unfreezes_from_the_top_and_never_touches_frozen_blocks(tmp_path: Path) -> None:
    spec = tiny_spec(
        tmp_path,
        model={"config": {**TINY_LLAMA, "num_hidden_layers": 4}},
        task={"name": "classification", "num_labels": 4},
        data=TOPICS,
        method={"name": "gradual_unfreezing", "gradual_unfreezing": {"every_steps": 4, "max_blocks": 2}},
        train={"max_steps": 16, "lr": 3e-3, "micro_batch_size": 4, "log_every": 4},
        hardware={"gpus_per_node": 2},
    )
    result = run_ftl("run", str(write_spec(tmp_path, spec)), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(spec["output_dir"])
    stages = [(r["step"], r["blocks_unfrozen"]) for r in records(run_dir) if r.get("event") == "unfreeze"]
    assert stages == [(1, 0), (5, 1), (9, 2)]

    out = tmp_path / "export"
    assert run_ftl("export", str(run_dir), "--to", str(out)).returncode == 0
    trained = load_file(out / "model.safetensors")

    from launcher.modeling import build_model
    from launcher.spec import spec_from_dict

    torch.manual_seed(0)
    initial = dict(build_model(spec_from_dict(spec), label_names=["food", "sports", "technology", "weather"], pad_token_id=0).state_dict())
    for key, tensor in trained.items():
        changed = not torch.equal(tensor, initial[key])
        expect_changed = key.startswith(("model.layers.2.", "model.layers.3.", "score."))
        assert changed == expect_changed, f"{key}: changed={changed}, expected {expect_changed}"


def test_early_stopping_stops_when_the_metric_stalls(tmp_path: Path) -> None:
    spec = tiny_spec(
        tmp_path,
        task={"name": "classification", "num_labels": 4},
        data=TOPICS,
        method={"name": "freeze"},
        # An LR this small leaves accuracy exactly where it is: no improvement, so patience runs out.
        train={"max_steps": 40, "lr": 1e-12, "eval_every": 2, "early_stopping_patience": 2, "early_stopping_metric": "accuracy"},
        hardware={"gpus_per_node": 2},
    )
    result = run_ftl("run", str(write_spec(tmp_path, spec)), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = records(Path(spec["output_dir"]))
    stop = [r for r in logged if r.get("event") == "early_stop"]
    assert stop and stop[0]["step"] == 6, logged
    assert (Path(spec["output_dir"]) / "checkpoints/step-6").is_dir()


def test_minilm_pretrained_classifier_learns_held_out_words(tmp_path: Path) -> None:
    """The shipped MiniLM config with LoRA: validation sentences use topic words never seen in training,
    which only pretrained knowledge can place (chance is 0.25)."""
    result = run_ftl(
        "run", "configs/minilm-classify.yaml", "method.name=lora", "train.lr=2e-3", "train.max_steps=30",
        "train.eval_every=0", f"output_dir={tmp_path / 'run'}", timeout=500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = [r for r in records(tmp_path / "run") if "accuracy" in r][-1]
    assert final["accuracy"] >= 0.8, final
