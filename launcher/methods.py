"""Fine-tuning methods: what trains and what stays frozen, applied to a built model (a component; no
knowledge of the loop or the CLI). The same functions run on the meta device for the planner's counts
and on the real model in the train entry, so the plan counts exactly what will train.

- `full`: everything trains.
- `lora` / `qlora`: PEFT LoRA adapters on a frozen base (4-bit for qlora: see launcher/modeling.py).
- `prompt_tuning`: PEFT virtual prompt tokens; the whole model is frozen.
- `freeze`: feature extraction (only the task head trains) or the embeddings + first N blocks frozen. A
  head tied to the embeddings trains (and the embeddings with it) when only the head trains; with N blocks
  it is frozen with the embeddings.
- `gradual_unfreezing`: the head first, then one more block from the top every K steps.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from launcher.errors import FTLError
from launcher.model_info import transformer_blocks
from launcher.spec import JobSpec, MethodSpec
from strategies.catalog import refusal, runnable

def head_names(model: torch.nn.Module, num_labels: int | None) -> list[str]:
    """Qualified names of the task head's modules. Classification: every Linear outside the transformer
    blocks with `num_labels` outputs (Llama's `score`, BERT's `classifier`); causal LM: the LM head.
    Found structurally, so a new architecture needs no table."""
    if num_labels is None:
        head = model.get_output_embeddings()
        return [name for name, module in model.named_modules() if module is head]
    in_blocks = {id(m) for block in transformer_blocks(model) for m in block.modules()}
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.out_features == num_labels and id(module) not in in_blocks
    ]
    if not found:
        raise FTLError(f"Cannot find the classification head of {type(model).__name__} (a Linear with num_labels outputs).")
    return found


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_head_param(name: str, heads: list[str]) -> bool:
    """Whether parameter `name` belongs to a head module, whatever wrappers (DDP's `module.`, PEFT's
    `base_model.model.`) prefix it: the head's path must appear as whole components of the name."""
    return any(f".{head}." in f".{name}." for head in heads)


def embedding_param_names(model: torch.nn.Module) -> set[str]:
    """Parameters registered before the first transformer block: the token (and position, token type)
    embeddings and their norm. Module registration order puts them first in every HF family."""
    in_blocks = {id(p) for block in transformer_blocks(model) for p in block.parameters()}
    names = set()
    for name, param in model.named_parameters():
        if id(param) in in_blocks:
            break
        names.add(name)
    return names


def check_method(spec: JobSpec, model: torch.nn.Module) -> None:
    """Refuse incompatible or suspicious choices before any weight is loaded (`model` is on meta)."""
    method = spec.method
    if method.name in ("lora", "qlora"):
        targets = method.lora.target_modules
        if targets != "all-linear":
            names = [targets] if isinstance(targets, str) else targets
            leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            missing = [t for t in names if t not in leaves and not any(n.endswith(t) for n, _ in model.named_modules())]
            if missing:
                raise FTLError(
                    f"`method.lora.target_modules` names {missing}, which match no module of {type(model).__name__}. "
                    f"Its Linear layers are: {', '.join(sorted(leaves))}. Use some of those, or `all-linear`."
                )
    if method.name == "gradual_unfreezing":
        blocks = len(transformer_blocks(model))
        stages = min(method.gradual_unfreezing.max_blocks or blocks, blocks)
        needed = stages * method.gradual_unfreezing.every_steps
        if needed >= spec.train.max_steps:
            raise FTLError(
                f"`method.gradual_unfreezing`: unfreezing {stages} blocks every {method.gradual_unfreezing.every_steps} "
                f"steps takes {needed} steps, but `train.max_steps` is {spec.train.max_steps}: the schedule is longer "
                "than the run. Lower `every_steps`, set `max_blocks`, or raise `train.max_steps`."
            )


def check_supported(method: str, strategy: str, device: str) -> None:
    """The method x strategy x device table (strategies/catalog.py) as a user-facing check: run by the CLI on
    the plan before anything is written, and by every rank on the plan it was given."""
    why = refusal(method, strategy, device)
    if why:
        raise FTLError(
            f"`method.name: {method}` with `strategy: {strategy}` is refused: {why}. Drop `strategy` (the planner then "
            f"picks one that runs) or force one of: {', '.join(runnable(method, device))}."
        )


def apply_method(model: torch.nn.Module, spec: JobSpec) -> torch.nn.Module:
    """Set what trains; returns the model to train (a PEFT wrapper for PEFT methods)."""
    method = spec.method
    num_labels = spec.task.num_labels
    if method.name == "full":
        return model
    if method.name in ("freeze", "gradual_unfreezing"):
        heads = head_names(model, num_labels)
        frozen_blocks: int | str = method.freeze.blocks if method.name == "freeze" else "all"
        freeze_layers(model, heads, frozen_blocks, method.freeze.embeddings if method.name == "freeze" else True)
        return model
    return _peft(model, method, spec.task.name, num_labels)


def freeze_layers(model: torch.nn.Module, heads: list[str], blocks: int | str, embeddings: bool) -> None:
    """`blocks="all"`: only the head trains. N: the first N blocks (and the embeddings if asked) freeze.

    A head tied to the input embeddings (tie_word_embeddings: one tensor, listed once, under the embedding's
    name) is that tensor: with `blocks="all"` (feature extraction, gradual unfreezing's first stage) it trains,
    as the head, so the input embeddings change with it — the only way a causal LM's head can train at all.
    With N blocks it follows `embeddings`: frozen with them (the default; the top blocks and final norm train),
    trained with them otherwise."""
    if blocks == "all":
        modules = dict(model.named_modules())
        head_params = {id(p) for head in heads for p in modules[head].parameters()}  # by identity: tied ones too
        for param in model.parameters():
            param.requires_grad_(id(param) in head_params)
        return
    all_blocks = transformer_blocks(model)
    if blocks > len(all_blocks):
        raise FTLError(f"`method.freeze.blocks` is {blocks} but the model has {len(all_blocks)} blocks.")
    for block in all_blocks[:blocks]:
        block.requires_grad_(False)
    if embeddings:
        frozen = embedding_param_names(model)
        for name, param in model.named_parameters():
            if name in frozen and not is_head_param(name, heads):
                param.requires_grad_(False)


def unfreeze_top_blocks(blocks: list[torch.nn.Module], count: int) -> int:
    """Make the top `count` blocks trainable; returns `count`."""
    for block in blocks[len(blocks) - count :]:
        block.requires_grad_(True)
    return count


def unfrozen_blocks_at(method: MethodSpec, step: int, num_blocks: int) -> int:
    """Gradual unfreezing: blocks trainable (from the top) during `step` (1-based)."""
    every = method.gradual_unfreezing.every_steps
    cap = min(method.gradual_unfreezing.max_blocks or num_blocks, num_blocks)
    return min((step - 1) // every, cap)


def _peft(model: torch.nn.Module, method: MethodSpec, task: str, num_labels: int | None) -> torch.nn.Module:
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

    task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
    if method.name in ("lora", "qlora"):
        lora = method.lora
        targets = lora.target_modules
        config = LoraConfig(
            task_type=task_type,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            modules_to_save=list(lora.modules_to_save) or None,
        )
    else:
        # Text init is done by `init_prompt_from_text` with FTL's own tokenizer: PEFT's TEXT init loads a
        # tokenizer by name, which fails for the byte tokenizer and would reach for the hub.
        config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=method.prompt_tuning.num_virtual_tokens)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise FTLError(f"PEFT refused `method.{method.name}` on {type(model).__name__}: {exc}") from None


@torch.no_grad()
def init_prompt_from_text(model: torch.nn.Module, token_ids: list[int]) -> None:
    """Start the virtual tokens from the embeddings of `token_ids`, repeated to fill the prompt. Works on
    a sharded or partitioned model too (the embedding table is gathered once; each rank keeps its part of
    the prompt)."""
    from launcher.weights import full_value, set_full_value

    if not token_ids:
        raise FTLError("`method.prompt_tuning.init_text` tokenizes to nothing; give some words.")
    prompt = model.prompt_encoder["default"].embedding.weight
    ids = torch.tensor((token_ids * (prompt.shape[0] // len(token_ids) + 1))[: prompt.shape[0]])
    with full_value(model.get_input_embeddings().weight) as table:
        set_full_value(prompt, table[ids.to(table.device)].to(prompt.dtype))


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def first_step_gradient_problem(model: torch.nn.Module, check_missing: bool = True) -> str:
    """After the first backward: a description of trainable parameters that got no gradient, or ''.

    The known cause is bitsandbytes on CPUs with AVX512-BF16: a forward in eval mode without gradients
    repacks 4-bit weights into an inference layout whose kernel has no backward, after which gradients
    stop at that layer and the adapters below it get none (or wrong ones) while the loss looks normal.
    """
    repacked = [
        name
        for name, module in model.named_modules()
        if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
    ]
    if repacked:
        return (
            f"{len(repacked)} 4-bit layers (e.g. {repacked[0]}) were repacked by bitsandbytes for CPU inference "
            "(a forward in eval mode without gradients ran before training), so gradients no longer flow through them"
        )
    # DeepSpeed ZeRO keeps gradients in its own partitions, never in `.grad`: only the repack check applies.
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None] if check_missing else []
    if missing:
        total = sum(p.requires_grad for p in model.parameters())
        return f"{len(missing)} of {total} trainable parameters got no gradient (e.g. {missing[0]})"
    return ""


@contextmanager
def all_trainable(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Temporarily mark `modules` trainable (to build an optimizer over them), then restore the flags."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for param, _ in saved:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param, flag in saved:
            param.requires_grad_(flag)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for validation that keeps 4-bit layers in train mode: bitsandbytes repacks 4-bit weights
    for inference on the first eval-mode forward on CPU, and training after that gets no gradients
    through them (see first_step_gradient_problem). Those layers behave the same in both modes otherwise."""
    model.eval()
    four_bit = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")]
    for module in four_bit:
        module.training = True
    try:
        yield
    finally:
        model.train()
