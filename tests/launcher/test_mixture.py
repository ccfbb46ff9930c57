"""The weighted mixture stream (launcher/mixture.py): exact proportions in every prefix and window, the
same global stream at any world size with ranks disjoint, exact resume (twice, and on another world size)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from launcher.data import Collator, Source, TrainStream
from launcher.mixture import Mixture

WEIGHTS, SIZES = (0.6, 0.3, 0.1), (5000, 700, 90)  # the small sources cycle many times over 10k draws


def test_each_source_holds_its_share_in_every_prefix_and_window() -> None:
    draws = Mixture(WEIGHTS, SIZES, seed=0).draws(10_000)
    counts = Counter(source for source, _ in draws)
    assert [counts[i] for i in range(3)] == [6000, 3000, 1000]  # within 1%: exact here
    for start in range(0, 10_000, 100):
        window = Counter(source for source, _ in draws[start : start + 100])
        assert all(abs(window[i] - 100 * w) <= 2 for i, w in enumerate(WEIGHTS)), (start, window)
    running = Counter()
    for n, (source, _) in enumerate(draws, start=1):
        running[source] += 1
        assert all(abs(running[i] - n * w) < 1 for i, w in enumerate(WEIGHTS))


def test_a_source_that_runs_out_starts_a_new_seeded_pass() -> None:
    draws = Mixture(WEIGHTS, SIZES, seed=0).draws(10_000)
    small = [row for source, row in draws if source == 2]
    passes = [small[i : i + 90] for i in range(0, 990, 90)]
    assert all(sorted(p) == list(range(90)) for p in passes)  # each pass: every row once
    assert passes[0] != passes[1]  # in a new order
    assert Mixture(WEIGHTS, SIZES, seed=0).draws(500) == draws[:500] != Mixture(WEIGHTS, SIZES, seed=1).draws(500)


def stream(world: int, rank: int) -> TrainStream:
    sources = [Source(f"s{i}", w, rows=[{"id": (i, r)} for r in range(n)], stats={}, built=False) for i, (w, n) in enumerate(zip(WEIGHTS, SIZES))]

    class Ids(Collator):  # the example ids instead of tensors: the stream is what is tested
        def __call__(self, rows):
            return rows

    return TrainStream(sources, Ids(seq_len=1, pad_id=0), micro_batch_size=4, rank=rank, world_size=world, seed=3)


def take(streams: list[TrainStream], steps: int) -> list:
    """The global order of example ids over `steps` micro-batches of every rank."""
    out = []
    for _ in range(steps):
        for s in streams:
            out += [row["id"] for row in s.next_batch()]
    return out


def test_the_union_is_the_same_on_1_2_and_4_ranks_and_ranks_are_disjoint() -> None:
    one = take([stream(1, 0)], 400)
    two = take([stream(2, r) for r in range(2)], 200)
    four = take([stream(4, r) for r in range(4)], 100)
    assert one == two == four  # every global draw goes to exactly one rank, in order
    fresh = [stream(4, r) for r in range(4)]
    first_round = [take([s], 1) for s in fresh]  # one micro-batch of each rank: 16 different examples
    assert len({i for batch in first_round for i in batch}) == 16


def test_resume_twice_and_on_another_world_size_continues_the_same_stream() -> None:
    whole = take([stream(2, r) for r in range(2)], 300)
    first = [stream(2, r) for r in range(2)]
    part = take(first, 100)
    saved = json.loads(json.dumps(first[0].state_dict()))  # the checkpoint holds JSON
    second = [stream(2, r) for r in range(2)]
    for s in second:
        s.load_state_dict(saved)
    part += take(second, 100)
    saved = json.loads(json.dumps(second[1].state_dict()))
    third = [stream(4, r) for r in range(4)]  # resumed on 4 ranks
    for s in third:
        s.load_state_dict(saved)
    part += take(third, 50)
    assert part == whole  # no gap, no duplicate


def test_changed_data_is_refused_on_resume() -> None:
    from launcher.errors import FTLError

    saved = stream(1, 0).state_dict()
    saved["mixture"]["sizes"][0] += 1
    with pytest.raises(FTLError, match="training data changed"):
        stream(1, 0).load_state_dict(saved)
