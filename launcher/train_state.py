"""What exact resume needs beside model and optimizer: RNG states and the spec fingerprint, as JSON.

Nothing here pickles: RNG states become lists of ints, so a checkpoint never executes code on load.
"""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import torch

from launcher.spec import JobSpec


def capture_rng() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def spec_fingerprint(spec: JobSpec) -> str:
    """A hash of what a checkpoint cannot survive changing: the model, method, task, tokenizer and
    sequence length. Steps, learning rate, world size and strategy may change on resume."""
    relevant = {
        "model": spec.model.model_dump(mode="json"),
        "method": spec.method.model_dump(mode="json"),
        "task": spec.task.model_dump(mode="json"),
        "tokenizer": spec.data.tokenizer,
        "seq_len": spec.train.seq_len,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
