"""Tokenize once (launcher/token_cache.py through launcher/data.py): a second start reads the cache, a
changed file is tokenized again; bad rows are skipped and counted or named; packing loses and repeats no
token; chat masks follow the template without generation tags; zero supervised tokens stop the job."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from launcher.data import TrainStream, build_tokenizer, collator, open_sources
from launcher.errors import FTLError
from launcher.spec import spec_from_dict
from tests.conftest import tiny_spec


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def job(tmp_path: Path, data: dict, **train):
    return spec_from_dict(tiny_spec(tmp_path, data={"cache_dir": str(tmp_path / "cache"), **data}, train={"seq_len": 32, **train}))


def texts(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"text": " ".join(f"w{int(x)}" for x in rng.integers(0, 50, rng.integers(1, 12)))} for _ in range(n)]


def test_second_start_reads_the_cache_and_a_changed_file_is_tokenized_again(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "a.jsonl", texts(3000))
    spec = job(tmp_path, {"train": str(data)})
    tokenizer = build_tokenizer(spec)
    started = time.monotonic()
    (first,) = open_sources(spec, tokenizer, spec.data.sources)
    first_s = time.monotonic() - started
    started = time.monotonic()
    (again,) = open_sources(spec, tokenizer, spec.data.sources)
    assert first.built and not again.built and time.monotonic() - started < first_s
    assert again.stats == first.stats and len(again) == len(first)
    write_jsonl(data, texts(3000, seed=1))  # same size, other content
    (changed,) = open_sources(spec, tokenizer, spec.data.sources)
    assert changed.built and len(list((tmp_path / "cache").glob("a-*"))) == 2


def test_packing_loses_and_repeats_no_token(tmp_path: Path) -> None:
    rows = texts(500)
    spec = job(tmp_path, {"train": str(write_jsonl(tmp_path / "p.jsonl", rows))})
    tokenizer = build_tokenizer(spec)
    (source,) = open_sources(spec, tokenizer, spec.data.sources)
    expected = [t for r in rows for t in tokenizer(r["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    blocks = np.stack([source.rows[i]["labels"] for i in range(len(source))]).reshape(-1)
    kept = blocks[blocks != -100].tolist()
    assert kept == expected  # in order, each token once; the last block's padding is masked
    positions = np.stack([source.rows[i]["position_ids"] for i in range(len(source))]).reshape(-1)[: len(expected)]
    lengths = [len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]
    doc_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    k = np.arange(len(expected))
    assert (positions == k - np.maximum(doc_start, k // 32 * 32)).all()  # restart at each document and each block


def test_bad_rows_are_skipped_and_counted_or_named(tmp_path: Path) -> None:
    rows = texts(20) + [{"text": ""}, {"other": "x"}, {"text": 5}] + texts(5)
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    spec = job(tmp_path, {"train": str(data)})
    (source,) = open_sources(spec, build_tokenizer(spec), spec.data.sources)
    assert source.stats["bad_rows"] == 3 and source.stats["rows"] == 28
    strict = job(tmp_path, {"train": str(data), "on_bad_rows": "fail"})
    with pytest.raises(FTLError, match=r"bad\.jsonl, line 21: .*'text'.* 3 of 28 rows"):
        open_sources(strict, build_tokenizer(strict), strict.data.sources)


LLAMA3_LIKE = (  # the header/eot structure of Llama 3.1's template, and like it no {% generation %} tags
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_chat_loss_is_on_assistant_turns_and_zero_supervision_stops(tmp_path: Path, monkeypatch) -> None:
    chat = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                          {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Italy?"},
                          {"role": "assistant", "content": "Rome."}]}]
    spec = job(tmp_path, {"train": str(write_jsonl(tmp_path / "chat.jsonl", chat * 4))}, seq_len=256)
    tokenizer = build_tokenizer(spec)
    tokenizer.chat_template = LLAMA3_LIKE
    (source,) = open_sources(spec, tokenizer, spec.data.sources)
    assert source.stats["format"] == "chat"
    labels = np.asarray(source.rows[0]["labels"])
    supervised = tokenizer.decode([t for t in labels.tolist() if t != -100])
    assert supervised == "Paris.<|eot_id|>Rome.<|eot_id|>"
    batch = collator(spec, tokenizer, None)([source.rows[0]])
    assert batch["labels"].shape == (1, 256)
    short = job(tmp_path, {"train": str(tmp_path / "chat.jsonl")}, seq_len=16)  # the first answer starts past 16 tokens
    with pytest.raises(FTLError, match="supervises zero tokens"):
        open_sources(short, tokenizer, short.data.sources)


def test_packed_mixture_token_shares_follow_the_weights(tmp_path: Path) -> None:
    a, b = write_jsonl(tmp_path / "a.jsonl", texts(2000)), write_jsonl(tmp_path / "b.jsonl", texts(300, seed=2))
    spec = job(tmp_path, {"train": None, "mixture": [{"path": str(a), "weight": 0.75}, {"path": str(b), "weight": 0.25}]})
    tokenizer = build_tokenizer(spec)
    sources = open_sources(spec, tokenizer, spec.data.sources)
    stream = TrainStream(sources, collator(spec, tokenizer, None), micro_batch_size=8, rank=0, world_size=1, seed=0)
    tokens = [0, 0]
    for _ in range(250):
        batch = stream.next_batch()
        for source, labels in zip(stream.last_sources, batch["labels"]):
            tokens[source] += int((labels != -100).sum())
    assert abs(tokens[0] / sum(tokens) - 0.75) < 0.01, tokens


def test_a_saved_dataset_folder_is_read_and_cached_without_writing_into_it(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(texts(300)).save_to_disk(str(folder))
    before = sorted(p.name for p in folder.iterdir())
    spec = job(tmp_path, {"train": str(folder)})
    tokenizer = build_tokenizer(spec)
    (first,) = open_sources(spec, tokenizer, spec.data.sources)
    (again,) = open_sources(spec, tokenizer, spec.data.sources)
    assert first.built and not again.built and len(first) == len(again)
    assert sorted(p.name for p in folder.iterdir()) == before  # datasets' intermediates went elsewhere


def test_one_name_is_one_source_across_phases(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    same_stem = [write_jsonl(d / "train.jsonl", texts(10)) for d in (a, b)]
    phases = [{"name": f"p{i}", "steps": 5, "mixture": [{"path": str(p)}]} for i, p in enumerate(same_stem)]
    with pytest.raises(FTLError, match="name 'train' is given to two different sources"):
        job(tmp_path, {"train": None, "phases": phases}, max_steps=10)


@pytest.mark.parametrize("docs_per_chunk", [1, 3, 1000])
def test_packing_streams_in_chunks_with_the_same_blocks(tmp_path: Path, docs_per_chunk: int) -> None:
    """Blocks written chunk by chunk (a document or a block may straddle chunks) equal the whole-source
    concatenation: ids, labels, and position ids restarting at each document and block start."""
    import datasets

    from launcher.token_cache import pack_blocks

    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 300, size=rng.integers(1, 40)).tolist() for _ in range(25)]
    labels = [[t if i % 3 else -100 for i, t in enumerate(d)] for d in docs]
    table = datasets.Dataset.from_dict({"input_ids": docs, "labels": labels})
    packed = pack_blocks(table, 16, 0, tmp_path / "packed.arrow", docs_per_chunk=docs_per_chunk).with_format("numpy")[:]
    ids, want_labels = np.concatenate(docs), np.concatenate(labels)
    starts = np.repeat(np.cumsum([len(d) for d in docs]) - [len(d) for d in docs], [len(d) for d in docs])
    pad = -len(ids) % 16
    index = np.arange(len(ids))
    positions = np.concatenate([index - np.maximum(starts, index // 16 * 16), np.arange(pad)])
    assert packed["input_ids"].tolist() == np.concatenate([ids, np.zeros(pad, int)]).reshape(-1, 16).tolist()
    assert packed["labels"].tolist() == np.concatenate([want_labels, np.full(pad, -100)]).reshape(-1, 16).tolist()
    assert packed["position_ids"].tolist() == positions.reshape(-1, 16).tolist()
