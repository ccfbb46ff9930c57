"""The run's schedule: its phases, and the cadence at which the loop logs, evaluates and stops.

Today every job has one phase, spanning steps 1..`train.max_steps` over `data.train`; continual phases
with replay (the data issue) add entries here, and the trainer already asks which phase a step is in
and saves the phase index in its state. Pure: no I/O, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.spec import JobSpec


@dataclass(frozen=True)
class Phase:
    name: str
    first_step: int  # 1-based, inclusive
    last_step: int  # inclusive
    train_data: Path


@dataclass(frozen=True)
class Schedule:
    phases: tuple[Phase, ...]
    max_steps: int
    stop_at: int | None
    log_every: int
    eval_every: int

    @classmethod
    def from_spec(cls, spec: JobSpec) -> "Schedule":
        train = spec.train
        only = Phase("train", 1, train.max_steps, spec.data.train)
        return cls((only,), train.max_steps, train.stop_at, train.log_every, train.eval_every)

    @property
    def last_step(self) -> int:
        """The last step this launch runs: `train.stop_at` pauses earlier (the LR schedule still spans max_steps)."""
        return min(self.max_steps, self.stop_at or self.max_steps)

    def phase_index(self, step: int) -> int:
        for i, phase in enumerate(self.phases):
            if phase.first_step <= step <= phase.last_step:
                return i
        return len(self.phases) - 1

    def should_log(self, step: int, first_step: int, last_step: int) -> bool:
        return step % self.log_every == 0 or step == first_step or step == last_step

    def should_evaluate(self, step: int, last_step: int) -> bool:
        """Periodic validation; the final one runs after the loop, once."""
        return bool(self.eval_every) and step % self.eval_every == 0 and step != last_step
