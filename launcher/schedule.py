"""The run's schedule: its phases, and the cadence at which the loop logs, evaluates and stops.

A job without `data.phases` has one phase, steps 1..`train.max_steps` over `data.train` (or
`data.mixture`); continual jobs have one per `data.phases` entry, back to back, each replaying a share
of the earlier phases' sources. Pure: no I/O, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from launcher.spec import JobSpec, SourceSpec


@dataclass(frozen=True)
class Phase:
    name: str
    first_step: int  # 1-based, inclusive
    last_step: int  # inclusive
    sources: tuple[SourceSpec, ...]  # the phase's training mixture
    replay: float = 0.0  # share of examples drawn from `replayed`
    replayed: tuple[SourceSpec, ...] = ()  # the earlier phases' sources
    replay_rows: int | None = None
    lr: float | None = None  # peak LR of the phase's own warmup + cosine cycle (None: the run's one schedule)
    warmup_steps: int = 0

    @property
    def steps(self) -> int:
        return self.last_step - self.first_step + 1


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
        if spec.data.phases is None:
            phases = (Phase("train", 1, train.max_steps, tuple(spec.data.sources)),)
        else:
            phases, first, earlier = [], 1, []
            own = any(p.lr is not None or p.warmup_steps is not None for p in spec.data.phases)
            for p in spec.data.phases:
                cycle = dict(lr=p.lr or train.lr, warmup_steps=train.warmup_steps if p.warmup_steps is None else p.warmup_steps) if own else {}
                phases.append(Phase(p.name, first, first + p.steps - 1, tuple(p.mixture), p.replay, tuple(earlier) if p.replay else (), p.replay_rows, **cycle))
                first, earlier = first + p.steps, earlier + [s for s in p.mixture if s.label not in {e.label for e in earlier}]
            phases = tuple(phases)
        return cls(phases, train.max_steps, train.stop_at, train.log_every, train.eval_every)

    @property
    def phase_cycles(self) -> bool:
        """Whether each phase has its own LR cycle (`data.phases[*].lr` / `warmup_steps`)."""
        return any(p.lr is not None for p in self.phases)

    @property
    def last_step(self) -> int:
        """The last step this launch runs: `train.stop_at` pauses earlier (the LR schedule still spans max_steps)."""
        return min(self.max_steps, self.stop_at or self.max_steps)

    def phase_index(self, step: int) -> int:
        for i, phase in enumerate(self.phases):
            if phase.first_step <= step <= phase.last_step:
                return i
        return len(self.phases) - 1

    def is_phase_end(self, step: int) -> bool:
        """The last step of a phase of a continual job (where it evaluates every task and checkpoints)."""
        return len(self.phases) > 1 and any(step == p.last_step for p in self.phases)

    def should_log(self, step: int, first_step: int, last_step: int) -> bool:
        return step % self.log_every == 0 or step == first_step or step == last_step

    def should_evaluate(self, step: int, last_step: int) -> bool:
        """Periodic validation; the final one runs after the loop, once."""
        return bool(self.eval_every) and step % self.eval_every == 0 and step != last_step
