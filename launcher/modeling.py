"""Build the job's model and optimizer (components; no knowledge of the CLI or the loop)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

from launcher.errors import FTLError
from launcher.methods import apply_method, check_method, head_names, is_head_param, unfreeze_top_blocks, unfrozen_blocks_at
from launcher.model_info import build_config, transformer_blocks
from launcher.planner import resolve_precision
from launcher.spec import JobSpec, TrainSpec
from strategies.catalog import traits


def pretrained_weights(spec: JobSpec) -> Path | None:
    """The folder whose weights the job starts from, or None for a random init."""
    if spec.model.name_or_path is not None and spec.model.init == "pretrained":
        return Path(spec.model.name_or_path)
    return None


def auto_class(spec: JobSpec) -> type:
    return AutoModelForSequenceClassification if spec.task.name == "classification" else AutoModelForCausalLM


def task_config(spec: JobSpec, label_names: list[str] | None = None, pad_token_id: int | None = None) -> PretrainedConfig:
    """The architecture config with the task's head size, label names and any dropout override."""
    config = build_config(spec.model)
    if spec.task.name == "classification":
        names = label_names or [str(i) for i in range(spec.task.num_labels)]
        config.num_labels = spec.task.num_labels
        config.id2label = {i: name for i, name in enumerate(names)}
        config.label2id = {name: i for i, name in enumerate(names)}
        if pad_token_id is not None and getattr(config, "pad_token_id", None) is None:
            # Decoder classifiers pool the last non-pad token and need to know the pad id.
            config.pad_token_id = pad_token_id
    if spec.train.dropout is not None:
        for key in list(config.to_dict()):
            if key.endswith(("dropout", "dropout_prob", "pdrop")) and isinstance(getattr(config, key, None), float | int):
                setattr(config, key, spec.train.dropout)
    config.use_cache = False
    return config


def build_model(
    spec: JobSpec,
    meta: bool = False,
    label_names: list[str] | None = None,
    pad_token_id: int | None = None,
    device: torch.device | None = None,
    attn_implementation: str | None = None,
    four_bit: bool = False,
    strategy: str | None = None,
) -> torch.nn.Module:
    """The job's model with its method applied: fp32 on the CPU (or 4-bit on `device` for QLoRA), loaded
    or randomly initialised (seeded by the caller), in train mode.

    With `meta`, parameters stay on the meta device (buffers are real: they are computed, not loaded)
    and the strategy materialises them shard by shard (strategies/fsdp2.py, launcher/weights.py); with
    `four_bit` too (a QLoRA rank's build), the block Linears are bitsandbytes 4-bit layers whose packed
    weights are still on meta. `strategy`: the planned one (a whole 4-bit base is stored for it; default
    ddp's layout). `attn_implementation` (meta only) is for launcher/measure.py, which traces
    this same model.
    """
    config = task_config(spec, label_names, pad_token_id)
    cls = auto_class(spec)
    try:
        if meta:
            extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
            with init_empty_weights(include_buffers=False):
                model = cls.from_config(config, dtype=torch.float32, **extra)
            model.tie_weights()  # init_empty_weights re-registers parameters, which unties shared ones
            if four_bit:
                four_bit_skeleton(model, spec, (device or torch.device("cpu")).type)
        elif spec.method.name == "qlora":
            model = _load_4bit(spec, config, cls, device or torch.device("cpu"), traits(strategy or "ddp").dtensor_params)
        elif pretrained_weights(spec) is not None:
            model = cls.from_pretrained(spec.model.name_or_path, config=config, local_files_only=True, dtype=torch.float32)
        else:
            model = cls.from_config(config, dtype=torch.float32)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise FTLError(
                f"`task: {spec.task.name}` needs a {cls.__name__.removeprefix('AutoModelFor')} head, which transformers "
                f"does not provide for model_type {config.model_type!r}. Use another task or model family."
            ) from None
        raise
    if spec.train.activation_checkpointing:
        # Non-reentrant checkpointing works under DDP/FSDP without find_unused_parameters.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    check_method(spec, model)
    model = apply_method(model, spec)
    model.train()  # from_pretrained returns eval mode: dropout would silently be off during training
    return model


def count_trainable(spec: JobSpec) -> int:
    """Parameters the method trains, counted on the meta device (no weights loaded); also runs the
    method's pre-load checks, so a bad combination fails here, before anything is loaded."""
    model = build_model(spec, meta=True)
    if spec.method.name == "gradual_unfreezing":  # memory is planned for the last stage, the largest
        blocks = transformer_blocks(model)
        unfreeze_top_blocks(blocks, unfrozen_blocks_at(spec.method, spec.train.max_steps, len(blocks)))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def four_bit_compute_dtype(spec: JobSpec, device_type: str) -> torch.dtype:
    qlora = spec.method.qlora
    choice = resolve_precision(spec.train.precision, device_type) if qlora.compute_dtype == "auto" else qlora.compute_dtype
    return torch.bfloat16 if choice == "bf16" else torch.float32


def four_bit_storage_dtype(spec: JobSpec, device_type: str) -> torch.dtype:
    """The dtype FSDP2 sees the packed 4-bit bytes as: its param dtype (the job's precision), so that its
    mixed-precision cast (which covers frozen parameters too) is no cast at all. With any other dtype it
    would convert the packed words numerically: garbage weights (bf16 precision with `compute_dtype: fp32`)."""
    return torch.bfloat16 if resolve_precision(spec.train.precision, device_type) == "bf16" else torch.float32


def four_bit_skeleton(model: torch.nn.Module, spec: JobSpec, device_type: str) -> None:
    """Replace every Linear outside the task head by a bitsandbytes 4-bit layer whose weight is the packed
    4-bit data, still on meta, so FSDP2 shards the packed bytes (launcher/weights.py quantises each weight
    into its shards). The packed storage dtype is FSDP2's param dtype (four_bit_storage_dtype): sharding
    and mixed-precision casts then move the bytes as opaque elements (Answer.AI's FSDP-QLoRA storage
    choice, where storage and compute dtype are both bf16)."""
    import bitsandbytes as bnb

    qlora = spec.method.qlora
    compute, storage = four_bit_compute_dtype(spec, device_type), four_bit_storage_dtype(spec, device_type)
    skip = set(head_names(model, spec.task.num_labels if spec.task.name == "classification" else None))
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or name in skip:
            continue
        layer = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None, compute_dtype=compute,
            compress_statistics=qlora.double_quant, quant_type=qlora.quant_type, quant_storage=storage, device="meta",
        )
        packed = torch.empty(((module.in_features * module.out_features + 1) // (storage.itemsize * 2), 1), dtype=storage, device="meta")
        layer.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, compress_statistics=qlora.double_quant, quant_type=qlora.quant_type,
            quant_storage=storage, module=layer, bnb_quantized=True,
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)


def store_frozen_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters in the compute dtype: they need no fp32 master copy (nothing updates them), so
    a LoRA base costs 2 B a parameter in bf16, not 4 (torchtune stores its LoRA base the same way). 4-bit
    weights keep their packed storage."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and type(param).__name__ != "Params4bit":
            param.data = param.data.to(dtype)


def _load_4bit(spec: JobSpec, config: PretrainedConfig, cls: type, device: torch.device, fsdp_storage: bool) -> torch.nn.Module:
    """A whole QLoRA base (DDP, ZeRO-1/2, or a random FSDP2 base: see launcher/trainer.py): the block
    Linears quantised to 4 bits by bitsandbytes as they load. bitsandbytes quantises in `from_pretrained`
    only, so a random-init job first writes its random model to a temporary folder. `fsdp_storage`
    (FSDP2): the packed storage dtype is FSDP2's param dtype, as in four_bit_skeleton.
    """
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    qlora = spec.method.qlora
    compute = four_bit_compute_dtype(spec, device.type)
    with init_empty_weights():
        skeleton = cls.from_config(config)
    skip = head_names(skeleton, spec.task.num_labels if spec.task.name == "classification" else None)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=qlora.quant_type,
        bnb_4bit_use_double_quant=qlora.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=four_bit_storage_dtype(spec, device.type) if fsdp_storage else torch.uint8,
        llm_int8_skip_modules=skip,  # the task head stays dense: it is trained in full
    )
    device_map = {"": device.index if device.type == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory(prefix="ftl-qlora-") as tmp:
        folder = pretrained_weights(spec)
        if folder is None:
            # Written with safetensors directly: `save_pretrained` writes on global rank 0 only once a
            # process group exists, and every rank needs its own copy here.
            from safetensors.torch import save_model

            save_model(cls.from_config(config, dtype=torch.float32), f"{tmp}/model.safetensors", metadata={"format": "pt"})
            config.save_pretrained(tmp)
            folder = Path(tmp)
        try:
            model = cls.from_pretrained(folder, config=config, quantization_config=quant, device_map=device_map, dtype=torch.float32, local_files_only=True)
        except ImportError as exc:
            raise FTLError(f"QLoRA needs bitsandbytes: `pip install -c constraints.txt '.[qlora]'` ({exc}).") from None
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=spec.train.activation_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def build_optimizer(
    model: torch.nn.Module, train: TrainSpec, device_type: str, heads: list[str] = (), new_head: bool = False
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay only on matrices (not norms, biases or other 1-D
    parameters). A new task head trains at `train.lr` and the pretrained body at `lr * body_lr_ratio`
    (default 0.1 with a new head, else 1)."""
    ratio = train.body_lr_ratio if train.body_lr_ratio is not None else (0.1 if new_head else 1.0)
    groups = param_groups(model.named_parameters(), train, heads, ratio)
    if not groups:
        raise FTLError("No parameter of the model is trainable: check `method` (e.g. `freeze.blocks`).")
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, fused=device_type == "cuda")


def param_groups(named_params, train: TrainSpec, heads: list[str], body_ratio: float) -> list[dict]:
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in named_params:
        if param.requires_grad:
            # A ZeRO-3 parameter built partitioned is an empty placeholder: its shape is ds_shape.
            key = (is_head_param(name, heads) or body_ratio == 1.0, len(getattr(param, "ds_shape", param.shape)) >= 2)
            buckets.setdefault(key, []).append(param)
    groups = []
    for (head, matrix), params in sorted(buckets.items(), reverse=True):
        groups.append(
            {
                "params": params,
                "lr": train.lr * (1.0 if head else body_ratio),
                "weight_decay": train.weight_decay if matrix else 0.0,
            }
        )
    return groups


def cosine_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """The LR multiplier `step` (0-based) optimizer steps into a cycle of `steps`: linear warmup from 0, then a
    half cosine to `min_ratio` (the same curve as transformers' get_cosine_with_min_lr_schedule_with_warmup,
    which builds whole schedulers only; a phase needs the curve)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSpec, phases: tuple = ()) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup then cosine decay to `min_lr_ratio`, applied to each group's own LR. With `phases` that
    have their own cycle (schedule.Phase.lr), each phase re-warms to its own peak and decays over its steps;
    group LR ratios (a new head's) hold within each phase."""
    if any(p.lr is not None for p in phases):  # schedule.Schedule.phase_cycles

        def factor(done: int) -> float:  # `done` optimizer steps taken: the next is step done + 1
            phase = next((p for p in phases if done + 1 <= p.last_step), phases[-1])
            return phase.lr / train.lr * cosine_factor(done + 1 - phase.first_step, phase.steps, phase.warmup_steps, train.min_lr_ratio)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    # Here, not at the top: transformers.optimization imports peft and bitsandbytes (through trainer_utils),
    # seconds that `ftl plan`, which imports this module to count parameters, does not need.
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=train.max_steps,
        min_lr_rate=train.min_lr_ratio,
    )
