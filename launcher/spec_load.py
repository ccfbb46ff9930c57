"""Reading a job spec: YAML -> paths anchored -> CLI overrides -> validated `JobSpec` (launcher/spec.py), plus
the notices a user should see about what loading adjusted (printed by the CLI; the spec stays pure).

Where relative paths start:
- what the job *reads* and ships with its spec (data files, eval sets, phases' sources, a local model or
  tokenizer folder), written in the spec file: at the spec file's folder, so `ftl run path/to/job.yaml`
  works from anywhere (as torchtune and Axolotl do);
- what the job *writes* (`output_dir`, `data.cache_dir`): at the current directory, so runs land where
  the command is run, whoever wrote the spec (torchtune's `output_dir` does the same; a spec in a shared
  read-only configs folder still works);
- any path given on the command line (`data.train=x.jsonl`): at the current directory, as a shell user
  expects.
The run dir's spec.yaml holds every path absolute, so the ranks read it wherever they start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from launcher.errors import FTLError
from launcher.spec import JobSpec
from launcher.spec_errors import explain_validation_error

# Paths the job reads, anchored at the spec file's folder when the spec file gives them relative (`*`: every
# entry of a list). Paths it writes are in WRITTEN_PATHS. tests/launcher/test_spec_edges.py checks that every
# path field of the spec is in one of the two.
READ_PATHS = (
    "model.name_or_path",
    "data.train",
    "data.validation",
    "data.mixture.*.path",
    "data.phases.*.mixture.*.path",
    "data.eval_sets.*.path",
    "data.tokenizer",
)
WRITTEN_PATHS = ("output_dir", "data.cache_dir")
_NOT_PATHS = {"model.name_or_path": ("package:",), "data.tokenizer": ("bytes", "auto")}  # values that name no file

# Sections holding one source among several: an override of one replaces the others (an inline model.config
# on the command line replaces the spec's name_or_path, data.train replaces data.mixture, ...).
ONE_OF = {"model": ("name_or_path", "config"), "data": ("train", "mixture", "phases")}

WARMUP_SHARE = 10  # a clamped warmup is a tenth of the run (transformers' common warmup_ratio 0.1)


@dataclass(frozen=True)
class LoadedSpec:
    spec: JobSpec
    notices: tuple[str, ...] = ()
    """What loading adjusted (a clamped warmup): one line each, for the CLI to print."""


def load_spec(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read a YAML job spec, apply `key.sub=value` overrides, validate. Raises FTLError on any mistake."""
    return read_spec(path, overrides).spec


def read_spec(path: str | Path, overrides: list[str] = ()) -> LoadedSpec:
    """`load_spec` with the notices about what loading adjusted."""
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
    anchor_read_paths(raw, path.resolve().parent)
    given = apply_overrides(raw, list(overrides))
    notices = clamp_warmup(raw, given)
    return LoadedSpec(spec_from_dict(raw, source=str(path)), tuple(notices))


def spec_from_dict(raw: dict[str, Any], source: str = "<spec>") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise FTLError(explain_validation_error(exc, source, JobSpec, raw)) from None


def anchor_read_paths(raw: dict[str, Any], folder: Path) -> None:
    """Make the relative READ_PATHS of a spec file's dict start at `folder` (in place). Values of the wrong
    type are left for validation to name."""
    for pattern in READ_PATHS:
        skip = _NOT_PATHS.get(pattern, ())
        for parent, key in _slots(raw, pattern.split(".")):
            value = parent[key]
            if isinstance(value, str) and value and not value.startswith(skip) and value not in skip and not Path(value).expanduser().is_absolute():
                parent[key] = str(folder / value)


def _slots(node: Any, parts: list[str]) -> list[tuple[dict, str]]:
    """(container, key) of every value at the dotted pattern `parts` that exists in `node`."""
    if not parts:
        return []
    head, rest = parts[0], parts[1:]
    if head == "*":
        children = node if isinstance(node, list) else []
        return [slot for child in children for slot in _slots(child, rest)]
    if not isinstance(node, dict) or node.get(head) is None:
        return []
    return [(node, head)] if not rest else _slots(node[head], rest)


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


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> set[str]:
    """Apply `key.sub=value` overrides to `raw` in place; returns the dotted keys they set. An override of one
    of a section's alternative sources (ONE_OF) removes the others the YAML gave."""
    given = set()
    for text in overrides:
        path, value = parse_override(text)
        given.add(".".join(path))
        node: Any = raw
        for depth, part in enumerate(path):
            if isinstance(node, list):  # a list entry by its index: `data.phases.1.replay=0`
                if not part.isdigit() or int(part) >= len(node):
                    raise FTLError(f"Override {text!r}: `{'.'.join(path[:depth])}` is a list of {len(node)}; give an index 0..{len(node) - 1}.")
                part = int(part)
            if depth == len(path) - 1:
                node[part] = value
                if depth == 1 and value is not None and part in ONE_OF.get(path[0], ()):
                    for other in ONE_OF[path[0]]:
                        if other != part:
                            node.pop(other, None)
                break
            child = node[part] if isinstance(node, list) else node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str) and part == "task":  # `task: causal_lm` is short for {name: causal_lm}
                child = node[part] = {"name": child}
            elif not isinstance(child, (dict, list)):
                raise FTLError(f"Override {text!r}: `{part}` holds a value, not a section, so it has no sub-keys.")
            node = child
    return given


def clamp_warmup(raw: dict[str, Any], given: set[str]) -> list[str]:
    """A `train.warmup_steps` from the YAML (or its default) that does not fit `train.max_steps` — a short
    trial run of a long job — becomes a tenth of the run, with a notice. One given on the command line is
    the user's explicit choice: left for validation to refuse."""
    train = raw.get("train")
    if not isinstance(train, dict) or "train.warmup_steps" in given:
        return []
    warmup, steps = train.get("warmup_steps", 0), train.get("max_steps")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (warmup, steps)) or steps <= 0 or warmup < steps:
        return []
    train["warmup_steps"] = steps // WARMUP_SHARE
    return [
        f"`train.warmup_steps` ({warmup}) does not fit `train.max_steps` ({steps}): warmup clamped to {steps // WARMUP_SHARE} "
        f"steps (a tenth of the run); pass `train.warmup_steps=N` to choose."
    ]
