"""Continual fine-tuning and evaluation sets, for the trainer: each phase's mixture with its replay of
earlier phases' data; named evaluation sets evaluated before training, every `eval_every` steps and at
each phase end (a row of the accuracy matrix R); the general-capability watch; the forgetting report.

R[i][j] is task j's metric after phase i: next-token accuracy on the supervised tokens for causal LM,
accuracy for classification (both higher is better). A task is an eval set; the first phase with a
source of the same name is where it is learned. launcher/forgetting.py computes the report's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from launcher.data import Examples, Source
from launcher.forgetting import ForgettingReport, forgetting_report, render_table, write_report
from launcher.schedule import Phase, Schedule
from launcher.spec import JobSpec


def phase_sources(phase: Phase, by_name: dict[str, Source], seed: int) -> list[Source]:
    """The phase's own sources at (1 - replay) of the weight, the earlier phases' sources at `replay`
    (each source's weight kept relative to the others of its group; `replay_rows`: a seeded subset)."""
    own = [replace(by_name[s.label], weight=s.weight) for s in phase.sources]
    mine = {s.name for s in own}
    replayed = [s for s in phase.replayed if s.label not in mine]
    if not phase.replay or not replayed:
        return own
    out = [replace(s, weight=(1 - phase.replay) * s.weight / sum(o.weight for o in own)) for s in own]
    total = sum(s.weight for s in replayed)
    for i, spec in enumerate(replayed):
        source = by_name[spec.label]
        rows = source.rows
        if phase.replay_rows and phase.replay_rows < len(rows):  # a fixed reservoir, the same on every rank and resume
            keep = np.random.Generator(np.random.PCG64([seed, 7919, i])).permutation(len(rows))[: phase.replay_rows]
            rows = rows.select(sorted(keep.tolist()), keep_in_memory=True)  # nothing written into the cache
        out.append(replace(source, rows=rows, weight=phase.replay * spec.weight / total))
    return out


@dataclass
class EvalSets:
    """The job's named evaluation sets and what was measured on them (saved in the trainer state)."""

    spec: JobSpec
    sets: dict[str, Examples]
    evaluate: Callable[[Examples], dict[str, float]]  # collective: every rank calls it for each set
    baseline: dict[str, dict[str, float]] = field(default_factory=dict)  # before training
    rows: list[dict[str, dict[str, float]]] = field(default_factory=list)  # one per finished phase
    alarmed: list[str] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return "accuracy" if self.spec.task.name == "classification" else "token_accuracy"

    def measure(self) -> dict[str, dict[str, float]]:
        return {name: self.evaluate(examples) for name, examples in self.sets.items()}

    @staticmethod
    def flat(measured: dict[str, dict[str, float]]) -> dict[str, float]:
        """`<set>/<metric>` keys for metrics.jsonl."""
        return {f"{name}/{key}": value for name, metrics in measured.items() for key, value in metrics.items()}

    def watch(self, measured: dict[str, dict[str, float]]) -> list[str]:
        """The watched sets whose val_loss rose past their tolerance over the baseline, newly (each alarms
        once until it recovers): one line each."""
        alarms = []
        for e in self.spec.data.eval_sets:
            if not e.watch or e.name not in self.baseline:
                continue
            before, now = self.baseline[e.name]["val_loss"], measured[e.name]["val_loss"]
            over = now > before * (1 + e.max_regression)
            if over and e.name not in self.alarmed:
                self.alarmed.append(e.name)
                alarms.append(f"{e.name}: val_loss {now:.4f} is {now / before - 1:+.1%} over its {before:.4f} before training "
                              f"(tolerated: {e.max_regression:.0%})")
            elif not over and e.name in self.alarmed:
                self.alarmed.remove(e.name)
        return alarms

    def should_stop(self, alarms: list[str]) -> bool:
        stoppers = {e.name for e in self.spec.data.eval_sets if e.stop_on_regression}
        return any(line.split(":")[0] in stoppers for line in alarms)

    def report(self, schedule: Schedule) -> ForgettingReport:
        tasks = list(self.sets)
        learned = [next((i for i, p in enumerate(schedule.phases) if any(s.label == task for s in p.sources)), None) for task in tasks]
        return forgetting_report(
            tasks, [p.name for p in schedule.phases][: len(self.rows)],
            [[row[t][self.metric] for t in tasks] for row in self.rows],
            [i if i is not None and i < len(self.rows) else None for i in learned],
            [self.baseline[t][self.metric] for t in tasks] if self.baseline else None,
            metric=self.metric,
        )

    def write(self, run_dir: Path, schedule: Schedule) -> str:
        """forgetting.json (and .png with matplotlib) in the run dir; returns the table for the log."""
        report = self.report(schedule)
        write_report(run_dir, report)
        return render_table(report)

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "rows": self.rows, "alarmed": self.alarmed}

    def load_state_dict(self, state: dict) -> None:
        self.baseline, self.rows, self.alarmed = state.get("baseline", {}), state.get("rows", []), state.get("alarmed", [])
