"""The trainer's state beside model and optimizer, as one object saved as JSON per rank: step, phase,
data position, LR schedule and RNG states; and the spec fingerprint a checkpoint must match.

Nothing here pickles: RNG states become lists of ints, so a checkpoint never executes code on load.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from launcher.spec import JobSpec


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    phase: int = 0  # index into the schedule's phases
    data: dict = field(default_factory=dict)  # the data stream's position (its own state_dict)
    scheduler: dict = field(default_factory=dict)  # the LR scheduler's state_dict
    rng: dict = field(default_factory=dict)  # capture_rng() of this rank
    evals: dict = field(default_factory=dict)  # eval sets' baseline, per-phase rows, watch alarms (launcher/continual.py)
    lr_schedule: dict = field(default_factory=dict)  # the train.* settings the LR schedule was built from (resume says what changed)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainerState":
        # `phase` is absent from checkpoints written before phases existed: they had one.
        return cls(step=data["step"], phase=data.get("phase", 0), data=data["data"], scheduler=data["scheduler"], rng=data["rng"],
                   evals=data.get("evals", {}), lr_schedule=data.get("lr_schedule", {}))


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
