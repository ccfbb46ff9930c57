"""Data augmentation for small training sets (off by default): a function applied to each training example
as it is drawn, with its own seeded RNG (seeded by the run's seed and the example's place in the global
stream), so a run and its resume augment identically at any world size.

`data.augment` names a built-in (`token_dropout`, `span_swap`) or a user function `module:function` taking
`(input_ids, labels, rng, p)` (numpy int arrays of one example, a `numpy.random.Generator`, the strength
`data.augment_p`) and returning the new `(input_ids, labels)`, aligned. Built-ins touch only supervised
positions' neighbourhoods they can keep aligned: they drop or move whole tokens, ids and labels together.
"""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np

from launcher.errors import FTLError

Augment = Callable[[np.ndarray, np.ndarray, np.random.Generator, float], tuple[np.ndarray, np.ndarray]]


def token_dropout(ids: np.ndarray, labels: np.ndarray, rng: np.random.Generator, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Delete each token with probability p (at least one token is kept)."""
    keep = rng.random(len(ids)) >= p
    if not keep.any():
        keep[0] = True
    return ids[keep], labels[keep]


def span_swap(ids: np.ndarray, labels: np.ndarray, rng: np.random.Generator, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Swap two non-overlapping spans, each about p of the example's length."""
    n = len(ids)
    span = max(1, int(n * p))
    if n < 2 * span + 1:
        return ids, labels
    first = int(rng.integers(0, n - 2 * span + 1))
    second = int(rng.integers(first + span, n - span + 1))
    order = np.arange(n)
    order[first : first + span], order[second : second + span] = np.arange(second, second + span), np.arange(first, first + span)
    return ids[order], labels[order]


BUILTIN: dict[str, Augment] = {"token_dropout": token_dropout, "span_swap": span_swap}


def resolve(name: str) -> Augment:
    """A built-in by name, or `module:function` imported from the job's Python path."""
    if name in BUILTIN:
        return BUILTIN[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise FTLError(f"`data.augment: {name}` is neither a built-in ({', '.join(BUILTIN)}) nor `module:function`.")
    try:
        function = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise FTLError(f"`data.augment: {name}`: cannot import it ({exc}). Put the module on PYTHONPATH (or in the working dir).") from None
    if not callable(function):
        raise FTLError(f"`data.augment: {name}` is not a function.")
    return function


def augment_rows(rows: list[dict], positions: list[int], augment: Augment, p: float, seed: int) -> list[dict]:
    """Each row augmented with the RNG of its global stream position (classification rows: ids only)."""
    out = []
    for row, position in zip(rows, positions):
        rng = np.random.Generator(np.random.PCG64([seed, 0xA46, position]))
        ids = np.asarray(row["input_ids"])
        labels = np.asarray(row["labels"]) if "labels" in row else np.zeros(len(ids), dtype=ids.dtype)
        new_ids, new_labels = augment(ids, labels, rng, p)
        if len(new_ids) != len(new_labels):
            raise FTLError(f"`data.augment` returned {len(new_ids)} ids but {len(new_labels)} labels: keep them aligned.")
        kept = {k: v for k, v in row.items() if k != "position_ids"}  # lengths may change: positions run on
        out.append({**kept, "input_ids": new_ids, **({"labels": new_labels} if "labels" in row else {})})
    return out
