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


def load_texts(path: Path, text_field: str) -> list[str]:
    try:
        table = datasets.load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for a malformed file; all mean "fix the file"
        raise FTLError(f"Cannot read data file {path}: {exc}. Check that it is valid {path.suffix[1:]}.") from None
    if text_field not in table.column_names:
        raise FTLError(
            f"Data file {path} has no column {text_field!r} (columns: {', '.join(table.column_names)}). "
            "Set `data.text_field` to the column holding the text."
        )
    return [t for t in table[text_field] if t]


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


def load_blocks(spec: JobSpec, tokenizer: PreTrainedTokenizerBase, path: Path) -> torch.Tensor:
    return pack(load_texts(path, spec.data.text_field), tokenizer, spec.train.seq_len, path)


@dataclass
class BlockStream:
    """This rank's endless stream of micro-batches: a seeded permutation per epoch (DistributedSampler),
    each rank taking its own slice. `position` (epoch, index) is all that exact resume needs."""

    blocks: torch.Tensor
    micro_batch_size: int
    rank: int
    world_size: int
    seed: int
    epoch: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        per_rank = len(self.blocks) // self.world_size
        if per_rank < self.micro_batch_size:
            raise FTLError(
                f"The data packs into {len(self.blocks)} sequences, too few for {self.world_size} ranks x "
                f"micro_batch_size {self.micro_batch_size}. Add data, or lower train.seq_len or train.micro_batch_size."
            )
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        sampler = DistributedSampler(
            range(len(self.blocks)), num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.seed, drop_last=True
        )
        sampler.set_epoch(self.epoch)
        return list(sampler)

    def next_batch(self) -> torch.Tensor:
        if self.index + self.micro_batch_size > len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order()
        take = self._order[self.index : self.index + self.micro_batch_size]
        self.index += self.micro_batch_size
        return self.blocks[take]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._epoch_order()
