"""The job spec: one typed, frozen tree loaded from YAML, with dotted CLI overrides on top.

Precedence is explicit: CLI override > YAML > field default. Every validation problem becomes one
`FTLError` paragraph that names the field and the fix; nothing downstream reads a raw dict.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from launcher.errors import FTLError

STRATEGIES = ("ddp", "zero1", "zero2", "fsdp2", "zero3", "zero3_offload", "fsdp2_offload")
StrategyName = Literal["auto", "ddp", "zero1", "zero2", "fsdp2", "zero3", "zero3_offload", "fsdp2_offload"]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ModelSpec(_Section):
    name_or_path: str | None = None
    """A local Hugging Face model folder (config.json, and weights unless init is `random`). No hub is used."""
    config: dict[str, Any] | None = None
    """An inline architecture config: `model_type` (e.g. llama, gpt2, bert) plus that family's config fields."""
    init: Literal["pretrained", "random"] = "pretrained"
    """`pretrained` loads the weights in name_or_path; `random` builds the architecture with random init."""

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError(
                "give exactly one of `model.name_or_path` (a local model folder) or `model.config` "
                "(an inline architecture with `model_type`)"
            )
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("`model.config` needs a `model_type` key (e.g. `model_type: llama`)")
        if self.name_or_path is not None and not (Path(self.name_or_path) / "config.json").is_file():
            raise ValueError(
                f"`model.name_or_path` is {self.name_or_path!r}, which is not a folder holding config.json "
                "(FTL reads models from local folders only; relative paths start at the current directory)"
            )
        return self


class MethodSpec(_Section):
    name: Literal["full"] = "full"
    """How the model is fine-tuned. `full` trains every parameter."""


class DataSpec(_Section):
    train: Path
    """Training file: .jsonl, .json, .csv or .parquet, read through HF `datasets`."""
    validation: Path | None = None
    """Optional validation file, same format as `train`."""
    text_field: str = "text"
    """Column that holds the text."""
    tokenizer: str = "auto"
    """`bytes` (UTF-8 bytes, needs vocab_size >= 384), a local tokenizer folder, or `auto` (the model folder's
    tokenizer if it has one, else bytes)."""

    @field_validator("train", "validation")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        if path is None:
            return None
        if not path.is_file():
            raise ValueError(f"file {str(path)!r} does not exist (relative paths start at {Path.cwd()})")
        if path.suffix not in {".jsonl", ".json", ".csv", ".parquet"}:
            raise ValueError(f"file {str(path)!r} has suffix {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
        return path.resolve()


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

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainSpec":
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"`train.warmup_steps` ({self.warmup_steps}) must be smaller than `train.max_steps` ({self.max_steps})"
            )
        return self


class CheckpointSpec(_Section):
    every: int = Field(0, ge=0)
    """Save every this many steps (0: only at the end)."""
    keep: int = Field(2, gt=0)
    """Complete checkpoints to keep; older ones are deleted, never the one `latest` points to."""
    async_save: bool = False
    """Write checkpoints in the background (DCP async: a copy to CPU memory, then a writer thread) while
    training goes on; at most one save in flight. It becomes `latest` once complete, at the next save or the end."""
    on_corrupt: Literal["error", "previous"] = "error"
    """When the checkpoint `latest` points to is damaged: stop with an error, or resume from the newest complete one."""


class HardwareSpec(_Section):
    nodes: int = Field(1, gt=0)
    """Machines in the job."""
    gpus_per_node: int = Field(1, gt=0)
    """GPUs (on CPU: processes) per machine."""
    gpu_mem: ByteSize = Field(ByteSize(80 * 10**9), gt=0)
    """Memory of one GPU (or, on CPU, the budget of one process), e.g. `80GB`, `24GiB`."""
    cpu_mem: ByteSize = Field(ByteSize(10**12), gt=0)
    """Host memory per machine, used when states are offloaded to the CPU, e.g. `1TB`."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses CUDA when this machine has it, else the CPU (gloo)."""


class JobSpec(_Section):
    model: ModelSpec
    """The model to fine-tune."""
    method: MethodSpec = MethodSpec()
    """The fine-tuning method and its options."""
    task: Literal["causal_lm"] = "causal_lm"
    """What the model learns: `causal_lm` (next-token prediction)."""
    data: DataSpec
    """Where the data comes from and how it is tokenized."""
    train: TrainSpec
    """Optimization hyperparameters."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """When to save and how many to keep."""
    hardware: HardwareSpec = HardwareSpec()
    """The machines the job runs on."""
    strategy: StrategyName = "auto"
    """`auto` lets the planner choose; or force one of: """ + ", ".join(STRATEGIES)
    output_dir: Path
    """The run directory: spec.yaml, plan.json, metrics.jsonl and checkpoints go here."""

    @field_validator("output_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        return path.resolve()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003). The value is read as YAML, so lists and numbers work."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise FTLError(
            f"Override {text!r} is not of the form `key.sub=value` (e.g. `train.lr=3e-4` or `hardware.gpus_per_node=8`)."
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise FTLError(f"Override {text!r}: the value {raw!r} is not valid YAML ({exc}).") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise FTLError(f"Override {text!r}: `{part}` holds a value, not a section, so it has no sub-keys.")
            node = child
        node[path[-1]] = value
    return raw


def load_spec(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read a YAML job spec, apply `key.sub=value` overrides, validate. Raises FTLError on any mistake."""
    path = Path(path)
    if not path.is_file():
        raise FTLError(f"Job spec {str(path)!r} does not exist. Pass the path of a YAML file, e.g. configs/quickstart.yaml.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FTLError(f"Job spec {str(path)!r} is not valid YAML: {exc}. Fix the syntax at the line shown.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FTLError(f"Job spec {str(path)!r} must be a YAML mapping (model:, data:, train:, ...), not a {type(raw).__name__}.")
    return spec_from_dict(apply_overrides(raw, list(overrides)), source=str(path))


def spec_from_dict(raw: dict[str, Any], source: str = "<spec>") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise FTLError(explain_validation_error(exc, source)) from None


def explain_validation_error(exc: ValidationError, source: str) -> str:
    problems = [_explain_one(err) for err in exc.errors()]
    lead = f"Job spec {source} has {len(problems)} problem{'s' if len(problems) > 1 else ''}: "
    return lead + " ".join(problems) + " Run `ftl spec --schema` to see every field with its meaning."


def _explain_one(err: dict[str, Any]) -> str:
    loc = [str(part) for part in err["loc"] if not isinstance(part, int)]
    field = ".".join(loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, name = loc[:-1], loc[-1]
        known = _known_fields(parent)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f" Did you mean `{'.'.join(parent + [close[0]])}`?" if close else ""
        where = f"`{'.'.join(parent)}`" if parent else "the top level"
        return f"`{field}` is not a known key in {where} (known: {', '.join(known)}).{hint}"
    if kind == "missing":
        return f"`{field}` is required but missing; add it to the YAML or pass `{field}=...` on the command line."
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) or kind.startswith("value_error") else f" (got {got!r})"
    return f"`{field}`: {msg}{shown}."


def _known_fields(parent: list[str]) -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in parent:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
