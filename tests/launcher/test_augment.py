"""Augmentation (launcher/augment.py): built-ins keep ids and labels aligned, a user function is found by
`module:function`, and each example's augmentation depends only on its place in the global stream (the
same on 1 and 2 ranks, and after a resume)."""

from __future__ import annotations

import numpy as np
import pytest

from launcher.augment import augment_rows, resolve, span_swap, token_dropout
from launcher.data import Collator, Source, TrainStream
from launcher.errors import FTLError


def test_builtins_keep_ids_and_labels_aligned() -> None:
    ids = np.arange(100)
    rng = np.random.default_rng(0)
    kept_ids, kept_labels = token_dropout(ids, ids + 1000, rng, 0.2)
    assert 65 <= len(kept_ids) <= 95 and (kept_labels == kept_ids + 1000).all()
    swapped, swapped_labels = span_swap(ids, ids + 1000, rng, 0.1)
    assert sorted(swapped.tolist()) == ids.tolist() and not (swapped == ids).all() and (swapped_labels == swapped + 1000).all()


def test_user_function_by_module_and_name() -> None:
    assert resolve("launcher.augment:span_swap") is span_swap
    with pytest.raises(FTLError, match="neither a built-in"):
        resolve("shuffle_words")
    with pytest.raises(FTLError, match="cannot import"):
        resolve("no_such_module:f")


def stream(world: int, rank: int) -> TrainStream:
    rows = [{"input_ids": np.arange(i, i + 20), "labels": np.arange(i, i + 20)} for i in range(50)]

    class Raw(Collator):
        def __call__(self, rows):
            return [r["input_ids"].tolist() for r in rows]

    return TrainStream([Source("s", 1.0, rows, {}, False)], Raw(seq_len=20, pad_id=0), 2, rank, world, seed=5, augment=token_dropout, augment_p=0.3)


def test_augmentation_follows_the_global_stream_across_world_sizes_and_resume() -> None:
    one = [stream(1, 0).next_batch() for _ in range(1)]
    single = stream(1, 0)
    seq_one = [x for _ in range(6) for x in single.next_batch()]
    pair = [stream(2, 0), stream(2, 1)]
    seq_two = [x for _ in range(3) for s in pair for x in s.next_batch()]
    assert seq_one == seq_two and one[0] == seq_one[:2]
    assert any(len(x) < 20 for x in seq_one)  # tokens were dropped
    resumed = stream(1, 0)
    resumed.load_state_dict(single.state_dict())
    assert resumed.next_batch() == single.next_batch()
    assert augment_rows([{"input_ids": np.arange(5)}], [7], token_dropout, 0.5, 1)[0]["input_ids"].tolist() == \
        augment_rows([{"input_ids": np.arange(5)}], [7], token_dropout, 0.5, 1)[0]["input_ids"].tolist()
