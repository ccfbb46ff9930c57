"""The job spec's `data` section: training sources (one file, a weighted mixture, or continual phases
with replay), validation and evaluation sets, formats, tokenization cache. Part of the spec tree of
launcher/spec.py (which re-exports these classes)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


def _data_path(path: Path | None) -> Path | None:
    if path is None:
        return None
    path = path.expanduser()
    if path.is_dir():
        if not (path / "dataset_info.json").is_file():
            raise ValueError(f"folder {str(path)!r} is not a dataset saved with `Dataset.save_to_disk` (no dataset_info.json)")
        return path.resolve()
    if not path.is_file():
        # A spec file's relative paths arrive absolute (anchored at its folder, launcher/spec_load.py): a relative one
        # here came from the command line.
        where = "" if path.is_absolute() else f" (a relative path on the command line starts at the current directory, {Path.cwd()})"
        raise ValueError(f"file {str(path)!r} does not exist{where}")
    if path.suffix not in {".jsonl", ".json", ".csv", ".parquet"}:
        raise ValueError(f"file {str(path)!r} has suffix {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
    return path.resolve()


DataFormat = Literal["auto", "text", "completion", "alpaca", "chat", "classification"]


class SourceSpec(_Section):
    path: Path
    """A .jsonl, .json, .csv or .parquet file, or a folder saved with `Dataset.save_to_disk`."""
    weight: float = Field(1.0, gt=0)
    """This source's share of the training examples drawn (weights are normalised to sum to 1)."""
    name: str | None = None
    """Name in logs (`loss/<name>`); default: the file's stem."""
    format: DataFormat | None = None
    """Row format of this source; default: `data.format`."""

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path) -> Path:
        return _data_path(path)

    @property
    def label(self) -> str:
        return self.name or self.path.stem


class PhaseSpec(_Section):
    name: str
    """The phase's name (logs, the forgetting report)."""
    mixture: list[SourceSpec]
    """The phase's training sources with weights (as `data.mixture`)."""
    steps: int = Field(gt=0)
    """Optimizer steps of this phase; the phases' steps add up to `train.max_steps`."""
    replay: float = Field(0.0, ge=0, lt=1)
    """Share of this phase's examples drawn from the earlier phases' sources (by their weights), against forgetting."""
    replay_rows: int | None = Field(None, gt=0)
    """Replay only this many rows of each earlier source (a seeded reservoir); default: all of them."""
    lr: float | None = Field(None, gt=0)
    """This phase's peak learning rate. When any phase sets `lr` or `warmup_steps`, every phase runs its own
    warmup + cosine cycle over its steps (re-warming, as continual pre-training does), unset values taken
    from `train`; otherwise one schedule spans all phases."""
    warmup_steps: int | None = Field(None, ge=0)
    """This phase's linear warmup steps (with its own cycle; default `train.warmup_steps`)."""


class EvalSetSpec(_Section):
    name: str
    """The set's name: metrics are logged as `<name>/val_loss`, `<name>/accuracy`; a phase source of the same
    name makes it that phase's task in the forgetting report."""
    path: Path
    """A data file (or saved dataset folder) in any supported format."""
    format: DataFormat | None = None
    """Row format; default: `data.format`."""
    watch: bool = False
    """General-capability watch: compare each evaluation with the one before training; a loss that rose by more
    than `max_regression` logs an `alarm` event."""
    max_regression: float = Field(0.1, gt=0)
    """Tolerated relative rise of this set's val_loss over its value before training (0.1: 10%)."""
    stop_on_regression: bool = False
    """Stop the run (with a checkpoint) when the watch alarms."""

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path) -> Path:
        return _data_path(path)


class DataSpec(_Section):
    train: Path | None = None
    """Training file (or saved dataset folder), read through HF `datasets`. Give it, `mixture` or `phases`. A
    relative path in a spec file starts at the spec's folder (every data path does); on the command line, at the
    current directory."""
    mixture: list[SourceSpec] | None = None
    """Several training sources with weights: each example is drawn from the source furthest behind its
    weight's share (exact in every prefix of the stream); a source that runs out starts a new seeded pass."""
    phases: list[PhaseSpec] | None = None
    """Continual fine-tuning: phases trained one after another, each on its own mixture, optionally replaying
    earlier phases' data. At each phase end every eval set is evaluated (a row of the forgetting report)
    and a checkpoint is written."""
    eval_sets: list[EvalSetSpec] = []
    """Named evaluation sets, evaluated every `train.eval_every` steps, at each phase end, and before training."""
    validation: Path | None = None
    """Optional validation file, same format as `train`."""
    format: DataFormat = "auto"
    """Row format: `text`; `completion` (prompt/completion, loss on the completion); `alpaca`
    (instruction/input/output); `chat` (messages, loss on assistant turns); `classification` (text/label);
    `auto`: from the columns (and `task.completion_only_loss`)."""
    text_field: str = "text"
    """Column that holds the text."""
    label_field: str = "label"
    """`classification`: column holding the label (an integer id or a class name)."""
    prompt_field: str = "prompt"
    """`completion` format: column holding the prompt (no loss on it)."""
    completion_field: str = "completion"
    """`completion` format: column holding the completion (the loss is on it)."""
    messages_field: str = "messages"
    """`chat` format: column holding the list of {role, content} turns."""
    pack: bool | None = None
    """Concatenate documents into full `seq_len` blocks (position ids restart per document). Default: on for
    `text`, off for the formats with a prompt."""
    on_bad_rows: Literal["skip", "fail"] = "skip"
    """Rows that cannot be used (a missing field, a wrong type, empty text): skip and count them, or stop
    naming the file and row."""
    cache_dir: Path | None = None
    """Where tokenized sources are cached (Arrow, memory-mapped); default $FTL_CACHE_DIR or ~/.cache/ftl/tokenized.
    Must be shared by a node's ranks; each node builds a missing entry once."""
    num_proc: int = Field(2, gt=0)
    """Processes that tokenize a source the first time."""
    few_shot: int | None = Field(None, gt=0)
    """Train on only this many examples per class (classification) or per source (causal_lm), sampled with the seed."""
    augment: str | None = None
    """Augmentation of each training example as it is drawn (small sets): `token_dropout`, `span_swap`, or a
    function `module:function(input_ids, labels, rng, p)`; seeded per example, so resume repeats it exactly."""
    augment_p: float = Field(0.1, gt=0, lt=1)
    """Strength of `augment`: the share of tokens dropped, or the length of each swapped span."""
    tokenizer: str = "auto"
    """`bytes` (UTF-8 bytes, needs vocab_size >= 384), a local tokenizer folder, or `auto` (the model folder's
    tokenizer if it has one, else bytes)."""

    @field_validator("train", "validation")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        return _data_path(path)

    @field_validator("cache_dir")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        return None if path is None else path.expanduser().resolve()  # written to: at the current directory

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_folder(cls, value: str) -> str:
        if value in ("bytes", "auto") or not Path(value).expanduser().is_dir():
            return value  # a folder that is not there is named when the tokenizer is built
        return str(Path(value).expanduser().resolve())

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        given = [name for name in ("train", "mixture", "phases") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of `data.train` (one file), `data.mixture` (several, with weights) and `data.phases` "
                f"(continual); given: {', '.join(given) or 'none'}"
            )
        seen: dict[str, tuple] = {}
        for phase in self.phases or []:
            names = [s.label for s in phase.mixture]
            if len(set(names)) != len(names):
                raise ValueError(f"`data.phases` {phase.name!r} names its sources {names}: give each a distinct `name`")
            for source in phase.mixture:  # a name is one source in every phase (replay and reports go by name)
                if seen.setdefault(source.label, (source.path, source.format)) != (source.path, source.format):
                    raise ValueError(
                        f"`data.phases`: the name {source.label!r} is given to two different sources ({seen[source.label][0]} and "
                        f"{source.path}); give each source its own `name`"
                    )
        names = [e.name for e in self.eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"`data.eval_sets` has names {names}: give each set a distinct `name`")
        if self.mixture is not None:
            names = [s.label for s in self.mixture]
            if len(set(names)) != len(names):
                raise ValueError(f"`data.mixture` names its sources {names}: give each a distinct `name`")
        return self

    @property
    def sources(self) -> list[SourceSpec]:
        """The training sources of a job without phases: `mixture`, or `train` as a mixture of one."""
        if self.phases is not None:
            return [s for phase in self.phases for s in phase.mixture]
        return list(self.mixture) if self.mixture is not None else [SourceSpec(path=self.train, weight=1.0)]
