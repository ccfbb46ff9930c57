"""Training data for the ranks: sources tokenized once into a memory-mapped cache (launcher/token_cache.py),
mixed by weight into one global stream (launcher/mixture.py), cut into each rank's micro-batches.

The stream's position is global counters (launcher/mixture.py), the same at any world size: resume is
exact, on the same or another number of ranks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
import torch
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

from launcher.augment import Augment, augment_rows
from launcher.errors import FTLError
from launcher.formats import Fields, detect_format
from launcher.mixture import Mixture
from launcher.spec import JobSpec, SourceSpec
from launcher.token_cache import CachedSource, columns_of, default_cache_dir, ensure, open_entry

Examples = dict[str, torch.Tensor]  # model inputs by name, all with the example count as first dim


def build_tokenizer(spec: JobSpec) -> PreTrainedTokenizerBase:
    """`bytes` is ByT5's tokenizer: UTF-8 bytes plus specials, needing no vocabulary file (no hub here)."""
    choice = spec.data.tokenizer
    if choice == "auto":
        folder = spec.model.name_or_path
        has_own = folder and any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        choice = folder if has_own else "bytes"
    if choice == "bytes":
        return ByT5Tokenizer()
    if not Path(choice).is_dir():
        raise FTLError(f"`data.tokenizer` is {choice!r}, which is neither `bytes` nor a local tokenizer folder.")
    return AutoTokenizer.from_pretrained(choice, local_files_only=True)


def check_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    if len(tokenizer) > vocab_size:
        raise FTLError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}: token ids "
            f"would index past the embedding. Set `model.config.vocab_size` to at least {len(tokenizer)} "
            "(384 for `data.tokenizer: bytes`) or use a tokenizer that matches the model."
        )


def fields_of(spec: JobSpec) -> Fields:
    data = spec.data
    return Fields(text=data.text_field, prompt=data.prompt_field, completion=data.completion_field,
                  messages=data.messages_field, label=data.label_field)


def resolve_format(spec: JobSpec, path: Path, fmt: str | None) -> str:
    """The row format of a file: as given, else from the task and the file's columns."""
    fmt = fmt or spec.data.format
    if spec.task.name == "classification":
        return "classification"
    if fmt == "auto" and spec.task.completion_only_loss:
        return "completion"
    if fmt != "auto":
        return fmt
    columns = columns_of(path)
    try:
        return detect_format(columns, spec.task.name, fields_of(spec))
    except ValueError as exc:
        raise FTLError(f"Data file {path}: {exc} Set `data.format` (or the source's `format`) and the field names.") from None


def cached_source(spec: JobSpec, path: Path, fmt: str | None) -> CachedSource:
    fmt = resolve_format(spec, path, fmt)
    pack = spec.data.pack if spec.data.pack is not None else fmt == "text"
    return CachedSource(path, fmt, fields_of(spec), pack and fmt != "classification", spec.train.seq_len, spec.data.on_bad_rows)


@dataclass
class Source:
    """A tokenized source, memory-mapped: rows of `input_ids` and `labels` (or `label`, classification)."""

    name: str
    weight: float
    rows: datasets.Dataset
    stats: dict
    built: bool  # tokenized by this launch (else read from the cache)

    def __len__(self) -> int:
        return len(self.rows)


def open_sources(
    spec: JobSpec, tokenizer: PreTrainedTokenizerBase, sources: list[SourceSpec], builder: bool = True,
    agree: Callable[[bool], bool] = lambda failed: failed,
) -> list[Source]:
    """The sources, tokenized into the cache if missing. Collective when ranks call it: the `builder` (one
    rank per node) tokenizes, `agree` (any rank failed?) tells the others whether to go on."""
    cache_dir = spec.data.cache_dir or default_cache_dir()
    plans = [cached_source(spec, s.path, s.format) for s in sources]
    error: FTLError | None = None
    built: set[int] = set()
    if builder:
        try:
            built = {i for i, plan in enumerate(plans) if ensure(plan, tokenizer, cache_dir, spec.data.num_proc)[2]}
        except Exception as exc:  # every rank must reach `agree`, whatever went wrong here
            error = exc if isinstance(exc, FTLError) else FTLError(f"Preparing the training data failed: {type(exc).__name__}: {exc}")
    if agree(error is not None):
        raise error or FTLError("Preparing the training data failed on another rank (the rank that tokenizes; its paragraph is printed above).")
    opened = []
    for i, (source, plan) in enumerate(zip(sources, plans)):
        folder, stats, _ = ensure(plan, tokenizer, cache_dir, spec.data.num_proc)
        opened.append(Source(source.label, source.weight, open_entry(folder), stats, i in built))
    if spec.task.name == "causal_lm" and sum(s.stats["supervised_tokens"] for s in opened) == 0:
        raise FTLError(
            f"The training data supervises zero tokens (no completion or assistant turn survives `train.seq_len`="
            f"{spec.train.seq_len}): training would learn nothing. Check `data.format` and the field names, or raise seq_len."
        )
    return opened


# -- classification labels -----------------------------------------------------------------------


def label_names_of(spec: JobSpec, sources: list[Source]) -> list[str]:
    """Class names in id order: integer labels are ids 0..num_labels-1; names are sorted."""
    raw = sorted({v for s in sources for v in s.rows.with_format("arrow")["label"].to_pylist()})
    source = sources[0]
    num_labels = spec.task.num_labels
    if all(re.fullmatch(r"-?\d+", v) for v in raw):
        bad = [v for v in raw if not 0 <= int(v) < num_labels]
        if bad:
            raise FTLError(
                f"Data file {source.stats['file']}, column {spec.data.label_field!r}: label ids {bad[:5]} are outside "
                f"0..{num_labels - 1} (`task.num_labels` is {num_labels}). Raise num_labels or fix the labels."
            )
        return [str(i) for i in range(num_labels)]
    if len(raw) > num_labels:
        raise FTLError(
            f"Data file {source.stats['file']}, column {spec.data.label_field!r}, has {len(raw)} classes ({', '.join(raw[:8])}) but "
            f"`task.num_labels` is {num_labels}. Set task.num_labels to {len(raw)}."
        )
    return raw + [f"unused_{i}" for i in range(len(raw), num_labels)]


# -- batches ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Collator:
    """Rows -> model inputs of `seq_len`: packed blocks as they are, other rows truncated and right-padded
    with masked labels. Packed documents share attention within their block, as in a plain
    concat-and-chunk (document masking needs FlashAttention-2's varlen path, not used here yet):
    `data.pack: false` pads each document instead."""

    seq_len: int
    pad_id: int
    label_ids: dict[str, int] | None = None  # classification: class name -> id

    def __call__(self, rows: list[dict]) -> Examples:
        n, seq = len(rows), self.seq_len
        ids = np.full((n, seq), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, seq), dtype=np.int64)
        labels = np.full((n, seq), -100, dtype=np.int64)
        for i, row in enumerate(rows):
            length = min(len(row["input_ids"]), seq)
            ids[i, :length] = row["input_ids"][:length]
            mask[i, :length] = 1
            if self.label_ids is None:
                labels[i, :length] = row["labels"][:length]
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self.label_ids is not None:
            unknown = sorted({row["label"] for row in rows} - set(self.label_ids))
            if unknown:
                raise FTLError(f"Labels {unknown[:5]} do not occur in the training data's classes {list(self.label_ids)[:8]}.")
            batch["labels"] = torch.tensor([self.label_ids[row["label"]] for row in rows])
        else:
            batch["labels"] = torch.from_numpy(labels)
        return batch


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collator(spec: JobSpec, tokenizer: PreTrainedTokenizerBase, label_names: list[str] | None) -> Collator:
    labels = {name: i for i, name in enumerate(label_names)} if label_names is not None else None
    return Collator(spec.train.seq_len, pad_id(tokenizer), labels)


class TrainStream:
    """This rank's endless micro-batches from the global mixture stream: each micro-batch takes `world x
    micro_batch_size` draws and this rank keeps its own `micro_batch_size` of them."""

    def __init__(
        self, sources: list[Source], collate: Collator, micro_batch_size: int, rank: int, world_size: int, seed: int,
        augment: Augment | None = None, augment_p: float = 0.1,
    ) -> None:
        self.sources, self.collate = sources, collate
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.mixture = Mixture(tuple(s.weight for s in sources), tuple(len(s) for s in sources), seed)
        self.seed, self.augment, self.augment_p = seed, augment, augment_p
        self.last_sources: list[int] = []  # the source of each example of the last batch (per-source loss)

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def next_draws(self) -> list[tuple[int, int]]:
        draws = self.mixture.draws(self.world_size * self.micro_batch_size)
        mine = self.rank * self.micro_batch_size
        return draws[mine : mine + self.micro_batch_size]

    def next_batch(self) -> Examples:
        first = self.mixture.position + self.rank * self.micro_batch_size  # this rank's draws' global positions
        draws = self.next_draws()
        self.last_sources = [source for source, _ in draws]
        rows = [self.sources[source].rows[int(row)] for source, row in draws]
        if self.augment is not None:
            rows = augment_rows(rows, list(range(first, first + len(rows))), self.augment, self.augment_p, self.seed)
        return self.collate(rows)

    def state_dict(self) -> dict:
        return {"mixture": self.mixture.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "mixture" not in state:
            raise FTLError("The checkpoint's data position predates FTL's cached, mixed data stream; start the run again (`--no-resume`).")
        try:
            self.mixture.load_state_dict(state["mixture"])
        except ValueError as exc:
            raise FTLError(f"The training data changed since the checkpoint ({exc}): resume with the same data, or start again with `--no-resume`.") from None


# -- whole files (validation, tests) ----------------------------------------------------------------


def load_examples(
    spec: JobSpec, tokenizer: PreTrainedTokenizerBase, path: Path, label_names: list[str] | None = None,
    builder: bool = True, agree: Callable[[bool], bool] = lambda failed: failed, fmt: str | None = None,
) -> tuple[Examples, list[str] | None]:
    """Every row of a data file as model inputs (through the cache), and the class names (classification).
    Pass the training data's `label_names` when reading validation data so ids agree; ranks pass
    `builder` and `agree` as to `open_sources`."""
    (source,) = open_sources(spec, tokenizer, [SourceSpec(path=path, format=fmt)], builder, agree)
    if spec.task.name == "classification" and label_names is None:
        label_names = label_names_of(spec, [source])
    rows = [source.rows[i] for i in range(len(source))]
    return collator(spec, tokenizer, label_names)(rows), label_names


def few_shot_rows(spec: JobSpec, source: Source, k: int, seed: int) -> list[int]:
    """k rows of each class (classification) or k rows (causal LM), drawn with the seed, sorted."""
    rng = np.random.Generator(np.random.PCG64(seed))
    if spec.task.name != "classification":
        return sorted(rng.permutation(len(source))[:k].tolist())
    labels = np.asarray(source.rows.with_format("arrow")["label"].to_pylist())
    picked: list[int] = []
    for name in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == name)
        if len(members) < k:
            raise FTLError(f"`data.few_shot` is {k} but class {name!r} of {source.stats['file']} has {len(members)} examples. Lower few_shot or add examples.")
        picked += rng.permutation(members)[:k].tolist()
    return sorted(picked)


def loss_by_source(logits: torch.Tensor, labels: torch.Tensor, sources: list[int], count: int, chunk: int = 512) -> torch.Tensor:
    """[count, 2]: each source's summed loss and number of supervised targets in this micro-batch (causal
    LM: next-token cross-entropy per token; classification: per example). For `loss/<source>` logs.
    In chunks of `chunk` positions of one example: never a float copy of the whole micro-batch's logits."""
    out = torch.zeros(count, 2, device=logits.device)
    with torch.no_grad():
        if labels.dim() == 1:  # classification
            losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
            for i, source in enumerate(sources):
                out[source] += torch.stack([losses[i], torch.ones((), device=logits.device)])
            return out
        logits = logits[:, -labels.shape[1]:]  # prompt tuning prepends virtual tokens to the outputs
        for i, source in enumerate(sources):
            for start in range(0, labels.shape[1] - 1, chunk):
                targets = labels[i, start + 1 : start + 1 + chunk]
                part = logits[i, start : start + len(targets)].float()
                loss = torch.nn.functional.cross_entropy(part, targets, ignore_index=-100, reduction="sum")
                out[source] += torch.stack([loss, (targets != -100).sum().float()])
    return out
