"""Tokenize once: each data source becomes an Arrow dataset on disk that ranks memory-map.

The cache key is a hash of the file's bytes, the tokenizer (its class, vocabulary, special ids and chat
template), the row format and its fields, the task, packing and `train.seq_len`, and this module's
version: a second run with the same inputs reads the cache and tokenizes nothing; a changed file, or
any of those settings, makes a new entry. One process per node builds a missing entry (with
`data.num_proc` worker processes, through `datasets.map`), writes it into a temporary folder and renames
it into place, so a reader never sees half an entry and two builders never mix theirs. Arrow files are
memory-mapped: a rank's memory does not grow with the data set.

Rows that cannot be used (a missing field, a wrong type, empty text: launcher/formats.py says why) are
skipped and counted (`data.on_bad_rows: skip`), or stop the job naming the file and row
(`data.on_bad_rows: fail`). Packing (causal LM text): a source's documents, each ending in EOS, are
concatenated and cut into blocks of `seq_len`; the last partial block is padded with its labels
masked, so no token is lost or repeated; `position_ids` restart at every document.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np

from launcher.errors import FTLError
from launcher.formats import BadRow, Fields, classification_example, segments, tokenize_segments

CACHE_VERSION = 1
READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
STATS_FILE = "ftl-stats.json"

datasets.disable_progress_bars()  # one bar per process per file is noise in the training log


@dataclass(frozen=True)
class CachedSource:
    """Everything that decides a cached source's content."""

    path: Path
    format: str  # resolved: text, completion, alpaca, chat, classification
    fields: Fields
    pack: bool
    seq_len: int
    on_bad_rows: str  # skip | fail


def default_cache_dir() -> Path:
    return Path(os.environ.get("FTL_CACHE_DIR") or Path.home() / ".cache" / "ftl" / "tokenized")


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (a saved dataset folder: of its own files, by name; not of cache files
    datasets may have written beside them)."""
    digest = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name in ("dataset_info.json", "state.json") or (p.name.startswith("data-") and p.suffix == ".arrow"))
    else:
        files = [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the ids a tokenizer gives: class, vocabulary, the whole pipeline of a fast tokenizer
    (normalizer, pre-tokenizer, merges, post-processor), its init settings, specials, chat template, and
    the library version."""
    import transformers

    vocab = sorted(tokenizer.get_vocab().items())
    backend = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else None
    ident = [type(tokenizer).__name__, vocab, backend, sorted((k, str(v)) for k, v in tokenizer.init_kwargs.items()),
             tokenizer.eos_token_id, tokenizer.pad_token_id, getattr(tokenizer, "chat_template", None), transformers.__version__]
    return hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()[:16]


def cache_key(source: CachedSource, tokenizer_id: str) -> str:
    settings = {**asdict(source), "path": None, "fields": asdict(source.fields), "version": CACHE_VERSION, "tokenizer": tokenizer_id}
    blob = json.dumps(settings, sort_keys=True, default=str) + file_digest(source.path)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def read_rows(path: Path, work: Path) -> datasets.Dataset:
    """A data file (or a folder written by `Dataset.save_to_disk`) as a datasets table, its Arrow conversion
    in `work` (this build's own folder: datasets' shared cache keys local files by path and mtime, so a
    file replaced with the same mtime would come back stale)."""
    check_not_empty(path)
    try:
        if path.is_dir():
            table = datasets.load_from_disk(str(path))
        else:
            quiet = datasets.logging.get_verbosity()
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own log line of a parse error repeats ours
            try:
                table = datasets.load_dataset(READERS[path.suffix], data_files=str(path), split="train", cache_dir=str(work / "raw"))
            finally:
                datasets.logging.set_verbosity(quiet)
    except Exception as exc:  # datasets raises many types for a malformed file; all mean "fix the file"
        raise FTLError(f"Cannot read data file {path}: {first_bad_line(path) or str(exc).strip() or type(exc).__name__}. Check that it is valid {path.suffix[1:] or 'dataset'}.") from None
    if len(table) == 0:
        raise FTLError(f"Data file {path} has no rows. Point `data` at a file with examples in it.")
    return table


def first_bad_line(path: Path) -> str | None:
    """Where a JSON Lines file stops parsing, as `line N: reason` (datasets' own error names a row of its
    internal chunks, not a line of the file), or None for other formats or when every line parses."""
    if path.is_dir() or path.suffix != ".jsonl":
        return None
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                return f"line {number}: {exc}"
            if not isinstance(row, dict):
                return f"line {number}: a JSON {type(row).__name__}, not an object with fields"
    return None


def check_not_empty(path: Path) -> None:
    if path.is_file() and not path.read_bytes()[:65536].strip() and path.stat().st_size < 65536:
        raise FTLError(f"Data file {path} is empty. Point `data` at a file with examples in it (or fill it).")


def columns_of(path: Path) -> list[str]:
    """A data file's column names, from its first row or schema (not a parse of the whole file)."""
    check_not_empty(path)
    try:
        if path.is_dir():
            return datasets.load_from_disk(str(path)).column_names
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(path).names
        with path.open(encoding="utf-8") as f:
            if path.suffix == ".csv":
                import csv

                return next(csv.reader(f), [])
            if path.suffix == ".json":
                first = json.load(f)
                first = first[0] if isinstance(first, list) and first else first
            else:
                first = json.loads(next((line for line in f if line.strip()), "{}"))
    except (OSError, ValueError, StopIteration) as exc:
        raise FTLError(f"Cannot read data file {path}: {first_bad_line(path) or exc}. Check that it is valid {path.suffix[1:]}.") from None
    return list(first) if isinstance(first, dict) else []


def _tokenize(rows: dict, indices: list[int], fmt: str, fields: Fields, tokenizer) -> dict:
    """datasets.map function (batched): one output row per input row, bad rows marked, not dropped."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "label": [], "bad": [], "row": []}
    names = list(rows)
    for i, index in enumerate(indices):
        row = {name: rows[name][i] for name in names}
        ids, labels, label, bad = [], [], "", ""
        try:
            if fmt == "classification":
                text, raw = classification_example(row, fields)
                ids, label = tokenizer(text, add_special_tokens=True)["input_ids"], str(raw)
            else:
                ids, labels = tokenize_segments(segments(row, fmt, fields, tokenizer), tokenizer, eos=fmt != "chat")
        except BadRow as exc:
            bad = str(exc) or "unusable row"
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["label"].append(label)
        out["bad"].append(bad)
        out["row"].append(index)
    return out


def pack_blocks(table: datasets.Dataset, seq_len: int, pad_id: int, out: Path, docs_per_chunk: int = 20_000) -> datasets.Dataset:
    """The documents concatenated and cut into [blocks, seq_len] (position ids restarting at each document
    and block start), the last block padded with labels -100; written block by block to the Arrow file
    `out` and returned memory-mapped. Streams: memory stays at one chunk of documents whatever the source's
    size (a whole-source concatenation took 17 GB for a 200 MB corpus, bench/data.py)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.with_format("arrow")  # list_flatten and list_value_length respect slices (a filtered table)
    schema = pa.schema([(name, pa.list_(pa.int32(), seq_len)) for name in ("input_ids", "labels", "position_ids")])
    carry_ids = carry_labels = carry_starts = np.zeros(0, np.int64)
    base = 0  # global index of the first carried token: always a block start

    def emit(writer, ids: np.ndarray, labels: np.ndarray, starts: np.ndarray, first: int) -> None:
        index = first + np.arange(len(ids))
        positions = index - np.maximum(starts, index // seq_len * seq_len)  # from the document's start, or its block's
        arrays = [pa.FixedSizeListArray.from_arrays(pa.array(a.astype(np.int32)), seq_len) for a in (ids, labels, positions)]
        writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))

    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for begin in range(0, len(column), docs_per_chunk):
            chunk = column[begin : begin + docs_per_chunk]
            ids = pc.list_flatten(chunk["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
            labels = pc.list_flatten(chunk["labels"]).to_numpy(zero_copy_only=False).astype(np.int64)
            lengths = pc.list_value_length(chunk["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
            first_token = base + len(carry_ids)
            starts = first_token + np.repeat(np.cumsum(lengths) - lengths, lengths)  # each token's document start
            ids, labels = np.concatenate([carry_ids, ids]), np.concatenate([carry_labels, labels])
            starts = np.concatenate([carry_starts, starts])
            full = len(ids) // seq_len * seq_len
            if full:
                emit(writer, ids[:full], labels[:full], starts[:full], base)
            carry_ids, carry_labels, carry_starts, base = ids[full:], labels[full:], starts[full:], base + full
        if len(carry_ids):
            pad = seq_len - len(carry_ids)
            starts = np.concatenate([carry_starts, np.full(pad, base + len(carry_ids))])  # the padding counts from its own start
            emit(writer, np.concatenate([carry_ids, np.full(pad, pad_id)]), np.concatenate([carry_labels, np.full(pad, -100)]), starts, base)
    return datasets.Dataset.from_file(str(out))


def build(source: CachedSource, tokenizer, folder: Path, num_proc: int) -> dict:
    """Tokenize `source` into `folder` (not yet there); returns its stats. Everything is written in a
    private temporary folder beside it (its own name: builders on several nodes never share one), then
    renamed into place; datasets' intermediate files go there too and are removed with it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        return _build(source, tokenizer, folder, num_proc, tmp)
    except FTLError:
        raise
    except Exception as exc:  # a template refusing a conversation, a full disk: one paragraph, on every rank
        raise FTLError(
            f"Tokenizing data file {source.path} as `{source.format}` failed: {type(exc).__name__}: {str(exc).strip()[:600]}. "
            "Fix the file or the tokenizer's chat template, or choose another `data.format`."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build(source: CachedSource, tokenizer, folder: Path, num_proc: int, tmp: Path) -> dict:
    start = time.monotonic()
    table = read_rows(source.path, tmp)
    mapped = table.map(
        _tokenize, batched=True, batch_size=1000, with_indices=True, num_proc=max(1, min(num_proc, len(table) // 1000 or 1)),
        remove_columns=table.column_names, fn_kwargs={"fmt": source.format, "fields": source.fields, "tokenizer": tokenizer},
        new_fingerprint=f"ftl-{folder.name}", cache_file_name=str(tmp / "tokenized.arrow"),
    )
    bad_rows = mapped.filter(lambda b: [bool(x) for x in b], input_columns=["bad"], batched=True, cache_file_name=str(tmp / "bad.arrow"))
    if len(bad_rows) and source.on_bad_rows == "fail":
        first = bad_rows[0]
        where = f"line {first['row'] + 1}" if source.path.suffix == ".jsonl" else f"row {first['row']}"
        raise FTLError(
            f"Data file {source.path}, {where}: {first['bad']}. {len(bad_rows)} of {len(table)} rows are unusable; fix them, or "
            "set `data.on_bad_rows: skip` to train on the rest (the count is logged)."
        )
    good = mapped.filter(lambda b: [not x for x in b], input_columns=["bad"], batched=True, cache_file_name=str(tmp / "good.arrow")) if len(bad_rows) else mapped
    if len(good) == 0:
        raise FTLError(f"Data file {source.path}: none of its {len(table)} rows is usable as `{source.format}` (first: {bad_rows[0]['bad']}).")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    too_long = 0
    if source.format == "classification":
        final = good.select_columns(["input_ids", "label"])
        supervised = len(final)
    elif source.pack:
        final = pack_blocks(good, source.seq_len, pad_id, tmp / "packed.arrow")
        supervised = sum(int(np.count_nonzero(b["labels"] != -100)) for b in final.with_format("numpy").iter(batch_size=10_000))
    else:  # rows whose supervised part starts past seq_len teach nothing (a batch of only those has no loss)
        seq_len = source.seq_len
        counts = [int(np.count_nonzero(np.asarray(l[:seq_len]) != -100)) for b in good.with_format("numpy").iter(batch_size=10_000) for l in b["labels"]]
        if not any(counts):
            raise FTLError(
                f"Data file {source.path} supervises zero tokens: in no row does a completion or assistant turn start within "
                f"`train.seq_len`={seq_len} tokens, so training would learn nothing. Raise seq_len, or check `data.format` and the fields."
            )
        final = good.select_columns(["input_ids", "labels"]).select([i for i, n in enumerate(counts) if n], keep_in_memory=True)
        supervised, too_long = sum(counts), counts.count(0)
    entry = tmp / "entry"
    final.save_to_disk(str(entry))
    stats = {
        "file": str(source.path), "format": source.format, "rows": len(table), "bad_rows": len(bad_rows),
        "examples": len(final), "supervised_tokens": supervised, "unsupervised_within_seq_len": too_long, "packed": source.pack and source.format != "classification",
        "tokenize_s": round(time.monotonic() - start, 2),
    }
    (entry / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    try:
        os.rename(entry, folder)
    except OSError:  # another node's builder finished first: its entry is the same
        pass
    return stats


def entry_dir(source: CachedSource, tokenizer, cache_dir: Path) -> Path:
    return cache_dir / f"{source.path.stem[:40]}-{cache_key(source, tokenizer_fingerprint(tokenizer))}"


def ensure(source: CachedSource, tokenizer, cache_dir: Path, num_proc: int) -> tuple[Path, dict, bool]:
    """(entry folder, stats, whether it was built now): the cached entry, built first if missing."""
    folder = entry_dir(source, tokenizer, cache_dir)
    if (folder / STATS_FILE).is_file():
        return folder, json.loads((folder / STATS_FILE).read_text()), False
    cache_dir.mkdir(parents=True, exist_ok=True)
    return folder, build(source, tokenizer, folder, num_proc), True


def open_entry(folder: Path) -> datasets.Dataset:
    """A cached source, memory-mapped, rows as numpy arrays."""
    return datasets.load_from_disk(str(folder), keep_in_memory=False).with_format("numpy")
