"""Training data: local files read through HF `datasets`, tokenized, packed into fixed-length blocks,
and served to each rank in a seeded order whose position can be saved and restored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from torch.utils.data import DistributedSampler
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

from launcher.errors import FTLError
from launcher.spec import JobSpec

datasets.disable_progress_bars()  # one bar per rank per file is noise in the training log

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


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


def read_table(path: Path, columns: list[str]) -> datasets.Dataset:
    try:
        table = datasets.load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for a malformed file; all mean "fix the file"
        raise FTLError(f"Cannot read data file {path}: {exc}. Check that it is valid {path.suffix[1:]}.") from None
    for column, field in columns:
        if column not in table.column_names:
            raise FTLError(
                f"Data file {path} has no column {column!r} (columns: {', '.join(table.column_names)}). "
                f"Set `data.{field}` to the column that holds it."
            )
    return table


def load_texts(path: Path, text_field: str) -> list[str]:
    return [t for t in read_table(path, [(text_field, "text_field")])[text_field] if t]


def pack(texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, source: Path) -> torch.Tensor:
    """Concatenate tokenized texts (each ending in EOS) and cut into [n_blocks, seq_len]."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    flat = [tok for seq in ids for tok in (*seq, eos)]
    n_blocks = len(flat) // seq_len
    if n_blocks == 0:
        raise FTLError(
            f"Data file {source} holds {len(flat)} tokens, fewer than one sequence of `train.seq_len`={seq_len}. "
            "Add data or lower train.seq_len."
        )
    return torch.tensor(flat[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


Examples = dict[str, torch.Tensor]  # model inputs by name, all with the example count as first dim


def load_blocks(spec: JobSpec, tokenizer: PreTrainedTokenizerBase, path: Path) -> torch.Tensor:
    return pack(load_texts(path, spec.data.text_field), tokenizer, spec.train.seq_len, path)


def load_examples(
    spec: JobSpec, tokenizer: PreTrainedTokenizerBase, path: Path, label_names: list[str] | None = None
) -> tuple[Examples, list[str] | None]:
    """The model inputs of a data file for the job's task, and the class names (classification).
    Pass the training file's `label_names` when reading validation data so ids agree."""
    if spec.task.name == "classification":
        return _classification(spec, tokenizer, path, label_names)
    if spec.task.completion_only_loss:
        return _completions(spec, tokenizer, path), None
    texts = load_texts(path, spec.data.text_field)
    if spec.data.few_shot and path == spec.data.train:
        texts = _sample(texts, spec.data.few_shot, spec.train.seed)
    blocks = pack(texts, tokenizer, spec.train.seq_len, path)
    return {"input_ids": blocks, "labels": blocks}, None


def _sample(items: list, k: int, seed: int) -> list:
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in sorted(order[:k])]


def _completions(spec: JobSpec, tokenizer: PreTrainedTokenizerBase, path: Path) -> Examples:
    """Prompt + completion + EOS per example, truncated and right-padded to seq_len; the loss is on the
    completion only (labels -100 on the prompt and the padding)."""
    data = spec.data
    table = read_table(path, [(data.prompt_field, "prompt_field"), (data.completion_field, "completion_field")])
    rows = list(zip(table[data.prompt_field], table[data.completion_field]))
    if data.few_shot and path == data.train:
        rows = _sample(rows, data.few_shot, spec.train.seed)
    seq_len, pad = spec.train.seq_len, _pad_id(tokenizer)
    inputs, labels = [], []
    for prompt, completion in rows:
        p = tokenizer(prompt or "", add_special_tokens=False)["input_ids"]
        c = tokenizer(completion or "", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, lab = (p + c)[:seq_len], ([-100] * len(p) + c)[:seq_len]
        if all(t == -100 for t in lab):
            continue  # the prompt fills the whole sequence: nothing to learn from
        inputs.append(ids + [pad] * (seq_len - len(ids)))
        labels.append(lab + [-100] * (seq_len - len(lab)))
    if not inputs:
        raise FTLError(f"Data file {path}: every prompt is longer than `train.seq_len`={seq_len}; raise seq_len.")
    ids = torch.tensor(inputs)
    return {"input_ids": ids, "attention_mask": (torch.tensor(labels) != -100) | (ids != pad), "labels": torch.tensor(labels)}


def _classification(
    spec: JobSpec, tokenizer: PreTrainedTokenizerBase, path: Path, label_names: list[str] | None
) -> tuple[Examples, list[str]]:
    data, num_labels = spec.data, spec.task.num_labels
    table = read_table(path, [(data.text_field, "text_field"), (data.label_field, "label_field")])
    texts, raw = table[data.text_field], table[data.label_field]
    if label_names is None:
        if all(isinstance(v, int) for v in raw):
            bad = sorted({v for v in raw if not 0 <= v < num_labels})
            if bad:
                raise FTLError(
                    f"Data file {path}, column {data.label_field!r}: label ids {bad[:5]} are outside 0..{num_labels - 1} "
                    f"(`task.num_labels` is {num_labels}). Raise num_labels or fix the labels."
                )
            label_names = [str(i) for i in range(num_labels)]
        else:
            found = sorted({str(v) for v in raw})
            if len(found) > num_labels:
                raise FTLError(
                    f"Data file {path}, column {data.label_field!r}, has {len(found)} classes ({', '.join(found[:8])}) but "
                    f"`task.num_labels` is {num_labels}. Set task.num_labels to {len(found)}."
                )
            label_names = found + [f"unused_{i}" for i in range(len(found), num_labels)]
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({str(v) for v in raw} - set(index))
    if unknown:
        raise FTLError(f"Data file {path}, column {data.label_field!r}: labels {unknown[:5]} do not occur in the training file.")
    labels = [index[str(v)] for v in raw]
    rows = [(t, y) for t, y in zip(texts, labels) if t]
    if data.few_shot and path == data.train:
        rows = _few_shot_per_class(rows, data.few_shot, spec.train.seed)
    encoded = tokenizer(
        [t for t, _ in rows], truncation=True, max_length=spec.train.seq_len, padding="max_length", return_tensors="pt"
    )
    examples = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": torch.tensor([y for _, y in rows])}
    return examples, label_names


def _few_shot_per_class(rows: list[tuple[str, int]], k: int, seed: int) -> list[tuple[str, int]]:
    """k examples of each class, drawn with the seed (fewer if a class has fewer)."""
    picked = []
    for label in sorted({y for _, y in rows}):
        picked += _sample([r for r in rows if r[1] == label], k, seed + label)
    return picked


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass
class BlockStream:
    """This rank's endless stream of micro-batches: a seeded permutation per epoch (DistributedSampler),
    each rank taking its own slice. `position` (epoch, index) is all that exact resume needs."""

    examples: Examples
    micro_batch_size: int
    rank: int
    world_size: int
    seed: int
    epoch: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        per_rank = len(self) // self.world_size
        if per_rank < self.micro_batch_size:
            raise FTLError(
                f"The data holds {len(self)} training sequences, too few for {self.world_size} ranks x "
                f"micro_batch_size {self.micro_batch_size}. Add data, or lower train.seq_len or train.micro_batch_size."
            )
        self._order = self._epoch_order()

    def __len__(self) -> int:
        return len(self.examples["input_ids"])

    def _epoch_order(self) -> list[int]:
        sampler = DistributedSampler(
            range(len(self)), num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.seed, drop_last=True
        )
        sampler.set_epoch(self.epoch)
        return list(sampler)

    def next_batch(self) -> Examples:
        if self.index + self.micro_batch_size > len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order()
        take = self._order[self.index : self.index + self.micro_batch_size]
        self.index += self.micro_batch_size
        return {name: tensor[take] for name, tensor in self.examples.items()}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._epoch_order()
