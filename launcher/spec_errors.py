"""A spec's validation errors as one paragraph: the field, what is wrong, the fix.

An unknown key is answered by meaning before spelling: `learning_rate` is `train.lr` (ALIASES: the names
other trainers use — transformers' TrainingArguments, Axolotl, LLaMA-Factory, Lightning — mapped onto
FTL's fields), then a field of that name elsewhere in the tree (`weight_decay` at the top level is
`train.weight_decay`), then a close spelling in the same section. A spelling match alone answered
`train.learning_rate` with `train.early_stopping_patience`.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

_EPOCHS = "epochs"  # the one alias whose note is worked out with the job's own numbers

# Another tool's name -> (FTL's field, or None when FTL has no such setting; a note, or "").
ALIASES: dict[str, tuple[str | None, str]] = {}


def _alias(names: str, target: str | None, note: str = "") -> None:
    for name in names.split():
        ALIASES[name] = (target, note)


_alias("learning_rate lr_rate learningrate base_lr peak_lr max_lr", "train.lr")
_alias("min_lr min_learning_rate final_lr lr_end", "train.min_lr_ratio", "`train.min_lr_ratio` is a fraction of `train.lr`, not a rate: min_lr / lr")
_alias(
    "lr_scheduler lr_scheduler_type scheduler lr_schedule", "train.warmup_steps",
    "FTL's schedule is fixed: linear warmup over `train.warmup_steps`, then cosine decay to `train.min_lr_ratio` of `train.lr`",
)
_alias("warmup num_warmup_steps warmup_iters lr_warmup_steps", "train.warmup_steps")
_alias("warmup_ratio", "train.warmup_steps", "Give steps: warmup_steps = warmup_ratio × train.max_steps")
_alias(
    "batch_size per_device_train_batch_size per_gpu_train_batch_size train_batch_size micro_batch "
    "train_micro_batch_size_per_gpu global_batch_size total_batch_size bs",
    "train.micro_batch_size",
    "`train.micro_batch_size` is sequences per rank per forward pass; the global batch is micro_batch_size × grad_accum × ranks",
)
_alias("gradient_accumulation_steps gradient_accumulation accumulate_grad_batches grad_accumulation accum_steps", "train.grad_accum")
_alias("epochs num_epochs num_train_epochs max_epochs n_epochs", "train.max_steps", _EPOCHS)
_alias("steps num_steps total_steps max_iters train_steps iterations num_training_steps", "train.max_steps")
_alias(
    "max_seq_length max_seq_len max_length cutoff_len sequence_len seq_length sequence_length block_size "
    "context_length max_len model_max_length",
    "train.seq_len",
)
_alias("model_name_or_path pretrained_model_name_or_path base_model model_name model_path model_dir", "model.name_or_path")
_alias("lora_r lora_rank rank", "method.lora.r")
_alias("lora_alpha", "method.lora.alpha")
_alias("lora_dropout", "method.lora.dropout")
_alias("lora_target_modules lora_target", "method.lora.target_modules")
_alias(
    "adapter peft peft_type finetuning_type finetuning_method method_name tuning", "method.name",
    "`method.name` is one of full, lora, qlora, prompt_tuning, freeze, gradual_unfreezing",
)
_alias("load_in_4bit load_in_8bit quantization bnb_4bit_quant_type", "method.name", "4-bit training is `method.name: qlora` (options under `method.qlora`)")
_alias("gradient_checkpointing", "train.activation_checkpointing")
_alias("bf16 fp16 mixed_precision dtype torch_dtype amp", "train.precision", "`train.precision` is `auto`, `fp32` or `bf16`")
_alias("gradient_clipping grad_clip clip_grad_norm clip_grad", "train.max_grad_norm")
_alias("adam_beta1 adam_beta2 beta1 beta2", "train.betas", "It is a pair, e.g. `train.betas: [0.9, 0.95]`")
_alias("save_steps checkpoint_steps save_every checkpoint_every ckpt_every save_interval", "checkpoint.every")
_alias("save_total_limit keep_last max_checkpoints", "checkpoint.keep")
_alias("eval_steps evaluation_steps eval_interval val_check_interval validate_every", "train.eval_every")
_alias("logging_steps log_interval log_steps", "train.log_every")
_alias("num_gpus gpus n_gpus nproc_per_node", "hardware.gpus_per_node")
_alias("num_nodes nnodes", "hardware.nodes")
_alias("gpu_memory vram gpu_mem_gb", "hardware.gpu_mem", "Give a unit, e.g. `80GB`")
_alias(
    "dataset datasets train_file train_data dataset_path data_path train_path data_files", "data.train",
    "Several files with weights go in `data.mixture`",
)
_alias("validation_file val_file eval_file eval_dataset val_data valid_file val_set val_set_path", "data.validation")
_alias("text_column dataset_text_field text_key", "data.text_field")
_alias("label_column label_key", "data.label_field")
_alias("packing sample_packing group_texts", "data.pack")
_alias("output out_dir save_dir output_path run_dir outdir", "output_dir")
_alias("random_seed", "train.seed")
_alias("deepspeed fsdp zero_stage distributed_strategy parallelism", "strategy", "`strategy` is `auto` (the planner chooses) or one of ddp, zero1, zero2, fsdp2, zero3, ...")
_alias("tokenizer_name tokenizer_name_or_path tokenizer_path", "data.tokenizer")
_alias("num_classes n_classes", "task.num_labels")
_alias("task_type objective", "task.name")
_alias("early_stopping patience", "train.early_stopping_patience")
_alias("hidden_dropout_prob attention_dropout", "train.dropout")
_alias("resume_from_checkpoint resume", None, "FTL resumes from `output_dir`'s latest checkpoint by itself; `ftl run --no-resume` starts over")
_alias("optimizer optim", None, "FTL trains with AdamW: `train.lr`, `train.betas`, `train.weight_decay`")
_alias("report_to wandb_project logging_dir", None, "metrics go to RUN_DIR/metrics.jsonl (and TensorBoard with the tensorboard extra)")


def explain_validation_error(exc: ValidationError, source: str, root: type[BaseModel], raw: dict | None = None) -> str:
    """`raw`: the dict that was validated, for hints worked out with the job's own numbers."""
    problems = [_explain_one(err, root, raw or {}) for err in exc.errors()]
    lead = f"Job spec {source} has {len(problems)} problem{'s' if len(problems) > 1 else ''}: "
    return lead + " ".join(problems) + " Run `ftl spec --schema` to see every field with its meaning."


def _explain_one(err: dict[str, Any], root: type[BaseModel], raw: dict) -> str:
    loc = [str(part) for part in err["loc"] if not isinstance(part, int)]
    field = ".".join(loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, name = loc[:-1], loc[-1]
        known = known_fields(root, parent)
        where = f"`{'.'.join(parent)}`" if parent else "the top level"
        return f"`{field}` is not a known key in {where} (known: {', '.join(known)}).{unknown_key_hint(root, parent, name, err.get('input'), raw)}"
    if kind == "missing":
        return f"`{field}` is required but missing; add it to the YAML or pass `{field}=...` on the command line."
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) or kind.startswith("value_error") else f" (got {got!r})"
    return f"`{field}`: {msg}{shown}."


def unknown_key_hint(root: type[BaseModel], parent: list[str], name: str, value: Any, raw: dict) -> str:
    """' Did you mean `x`? ...' for an unknown key `name` in section `parent`, or ''."""
    key = name.lower().replace("-", "_")
    if key in ALIASES:
        target, note = ALIASES[key]
        if note == _EPOCHS:
            note = _epochs_note(value, raw)
        if target is None:
            return f" FTL has no `{name}`: {note}."
        return f" Did you mean `{target}`?" + (f" {note}." if note else "")
    elsewhere = [path for path in all_field_paths(root) if path.rsplit(".", 1)[-1] == key and path != ".".join(parent + [key])]
    if elsewhere:
        return f" Did you mean `{elsewhere[0]}`? (`{name}` belongs in `{elsewhere[0].rsplit('.', 1)[0] if '.' in elsewhere[0] else 'the top level'}`)."
    close = difflib.get_close_matches(name, known_fields(root, parent), n=1, cutoff=0.5)
    return f" Did you mean `{'.'.join(parent + [close[0]])}`?" if close else ""


def _epochs_note(value: Any, raw: dict) -> str:
    """Epochs as optimizer steps, with this job's batch numbers where the YAML gives them."""

    def number(section: str, name: str, default: int) -> int:
        found = (raw.get(section) or {}).get(name, default) if isinstance(raw.get(section, {}), dict) else default
        return found if isinstance(found, int) and found > 0 else default

    micro, accum = number("train", "micro_batch_size", 1), number("train", "grad_accum", 1)
    ranks = number("hardware", "nodes", 1) * number("hardware", "gpus_per_node", 1)
    epochs = value if isinstance(value, (int, float)) and not isinstance(value, bool) else "epochs"
    return (
        "FTL counts optimizer steps, not epochs: steps = epochs × rows / (micro_batch_size × grad_accum × ranks), "
        f"here {epochs} × rows / ({micro} × {accum} × {ranks}) = {epochs} × rows / {micro * accum * ranks} "
        "(rows: training examples; for packed text, blocks of `train.seq_len` tokens)"
    )


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel of a field's annotation: `LoraSpec | None`, `list[SourceSpec] | None` and the like."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for member in typing.get_args(annotation):
        found = _section_model(member)
        if found is not None:
            return found
    return None


def known_fields(root: type[BaseModel], parent: list[str]) -> list[str]:
    model: type[BaseModel] | None = root
    for part in parent:
        if model is None or part not in model.model_fields:
            return []
        model = _section_model(model.model_fields[part].annotation)
    return list(model.model_fields) if model is not None else []


def all_field_paths(root: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field of the tree as a dotted path, sections before their fields, in declaration order."""
    paths = []
    for name, info in root.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        section = _section_model(info.annotation)
        if section is not None:
            paths.extend(all_field_paths(section, path + "."))
    return paths
