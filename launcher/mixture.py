"""Weighted mixing of training sources: one deterministic global stream of (source, row) draws.

What a weight means: the share of *examples* drawn from a source (with packing, every example is one
block of `train.seq_len` tokens, so it is also the share of tokens). The rule that decides each draw:
the source furthest behind its target (`weight * draws so far - drawn from it`, ties to the first
listed) gives the next example. So every prefix of the stream holds each source within one example of
its target count: over 10k draws at 0.6/0.3/0.1 the counts are 6000/3000/1000 exactly, and any window of
100 is within two of target. HF's `interleave_datasets` samples sources at random instead, so its
proportions only hold on average (and its default `first_exhausted` stops at the first empty source).

When a source runs out it is *cycled*: it starts a new pass in a new seeded order (its own epoch), so
the weights hold over the whole run and a small source is repeated rather than dropped.

The stream is global: the same for any world size. Each optimizer step consumes `world x grad_accum x
micro_batch_size` draws and rank r takes its own slice of each micro-batch, so ranks are disjoint and a
resume on another world size continues the same stream. Its state is global counters only (draws so
far, and per source), so resume is exact, also twice in a row. Pure: numpy only, no I/O, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Mixture:
    """The stream over sources of `sizes` rows with `weights` (normalised here)."""

    weights: tuple[float, ...]
    sizes: tuple[int, ...]
    seed: int
    drawn: list[int] = field(default_factory=list)  # examples drawn from each source so far (global)
    _orders: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict, repr=False)  # source -> (epoch, order)

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.sizes) or not self.weights:
            raise ValueError("one weight per source")
        if any(w <= 0 for w in self.weights) or any(n <= 0 for n in self.sizes):
            raise ValueError("weights and sizes must be positive")
        total = float(sum(self.weights))
        self.weights = tuple(w / total for w in self.weights)
        self.drawn = list(self.drawn) or [0] * len(self.sizes)

    @property
    def position(self) -> int:
        """Draws so far, over all sources and ranks."""
        return sum(self.drawn)

    def next_source(self) -> int:
        n = self.position + 1
        deficits = [w * n - d for w, d in zip(self.weights, self.drawn)]
        return int(np.argmax(deficits))  # the first of equal deficits: argmax returns the lowest index

    def draw(self) -> tuple[int, int]:
        """The next (source, row): the source furthest behind its target, its next row in this pass's order."""
        source = self.next_source()
        epoch, offset = divmod(self.drawn[source], self.sizes[source])
        self.drawn[source] += 1
        return source, int(self.order(source, epoch)[offset])

    def draws(self, count: int) -> list[tuple[int, int]]:
        return [self.draw() for _ in range(count)]

    def order(self, source: int, epoch: int) -> np.ndarray:
        """Source `source`'s row order in pass `epoch`: a permutation seeded by (seed, source, epoch)."""
        cached = self._orders.get(source)
        if cached is None or cached[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, source, epoch]))
            cached = (epoch, rng.permutation(self.sizes[source]).astype(np.int64))
            self._orders[source] = cached
        return cached[1]

    def epochs(self) -> list[float]:
        """Passes over each source so far (fractional)."""
        return [d / n for d, n in zip(self.drawn, self.sizes)]

    def state_dict(self) -> dict:
        return {"drawn": list(self.drawn), "sizes": list(self.sizes), "weights": list(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["sizes"]) != list(self.sizes) or len(state["drawn"]) != len(self.sizes):
            raise ValueError(f"the checkpoint's sources have {state['sizes']} rows, these have {list(self.sizes)}")
        self.drawn = [int(d) for d in state["drawn"]]
