"""Forgetting report for continual fine-tuning: how training on later tasks changed the earlier ones.

A continual run trains phases 0..P-1 and, after each phase, evaluates every task j in 0..T-1:
R[i][j] is the metric on task j after phase i (P rows, T columns; P need not equal T, a phase may train
several tasks, and a task may be evaluated without ever being trained). learned_at[j] is the first phase
that trains on task j (None if none does), baseline[j] the metric before any training (optional).
With the last phase L = P-1, and only tasks that some phase trains counted:

- ACC, average accuracy (Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", 2017):
  mean over trained tasks of R[L][j]. The plain final metric, never sign-flipped (for a loss: mean loss).
- BWT, backward transfer (GEM 2017): mean over tasks with learned_at[j] < L of R[L][j] - R[learned_at[j]][j],
  how much later phases changed a task after it was learned.
- FWT, forward transfer (GEM 2017): mean over tasks with learned_at[j] >= 1 of
  R[learned_at[j]-1][j] - baseline[j], how much earlier phases helped a task before it was trained;
  None without a baseline.
- forgetting (Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018): for each task with
  learned_at[j] < L, f_j = max over l in [learned_at[j], L-1] of R[l][j] - R[L][j], the drop from the
  best value it had once learned; average forgetting is their mean. Chaudhry's max runs over every earlier
  phase; starting at learned_at[j] keeps a task's untrained (usually worse) values out of its "best".

GEM's own setting is P = T with learned_at[j] = j, where these are exactly its sums over 1..T-1 and 2..T.
For a metric where lower is better (higher_is_better=False, e.g. a loss) the differences are negated, so a
positive BWT or FWT always means "better" and positive forgetting always means "worse". A number over an
empty set of tasks is None, never NaN or 0.

Pure: forgetting_report and render_table do no I/O; write_report writes the run dir's files.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

JSON_FILE = "forgetting.json"
PNG_FILE = "forgetting.png"

# Written into forgetting.json so a reader of the file knows which paper each number follows.
DEFINITIONS: dict[str, str] = {
    "acc": "mean over trained tasks of R[P-1][j] (average accuracy, Lopez-Paz & Ranzato, GEM, NeurIPS 2017)",
    "bwt": "mean over tasks with learned_at[j] < P-1 of R[P-1][j] - R[learned_at[j]][j] "
           "(backward transfer, GEM 2017)",
    "fwt": "mean over tasks with learned_at[j] >= 1 of R[learned_at[j]-1][j] - baseline[j] "
           "(forward transfer, GEM 2017); null without a baseline",
    "forgetting": "per task with learned_at[j] < P-1: max over l in [learned_at[j], P-2] of R[l][j] - R[P-1][j] "
                  "(Chaudhry et al., Riemannian Walk, ECCV 2018)",
    "avg_forgetting": "mean of forgetting over its tasks (Chaudhry et al. 2018)",
    "sign": "with higher_is_better false every difference in bwt, fwt and forgetting is negated: positive "
            "bwt/fwt is better, positive forgetting is worse; acc is the plain mean; null = no task to average",
}


@dataclass(frozen=True)
class ForgettingReport:
    """The evaluation matrix of a continual run and the transfer numbers computed from it."""

    tasks: tuple[str, ...]
    """Task names, one per column of R."""
    phases: tuple[str, ...]
    """Phase names in training order, one per row of R."""
    R: tuple[tuple[float, ...], ...]
    """R[i][j]: the metric on task j after phase i (the papers' name for the matrix)."""
    learned_at: tuple[int | None, ...]
    """Per task, the index of the first phase that trains on it; None if no phase does."""
    baseline: tuple[float, ...] | None
    """Per task, the metric before any training; None if not measured (then fwt is None)."""
    metric: str = "accuracy"
    """What R holds, e.g. "accuracy" or "loss"."""
    higher_is_better: bool = True
    """False for a loss: bwt, fwt and forgetting are then sign-flipped (see the module docstring)."""

    def __post_init__(self) -> None:
        _check_shapes(self)

    def _gain(self, new: float, old: float) -> float:
        """How much better `new` is than `old`, in the metric's direction."""
        return new - old if self.higher_is_better else old - new

    def _trained(self) -> list[tuple[int, int]]:
        """(task index, first phase training it) for every trained task."""
        return [(j, at) for j, at in enumerate(self.learned_at) if at is not None]

    @property
    def acc(self) -> float | None:
        return _mean([self.R[-1][j] for j, _ in self._trained()])

    @property
    def bwt(self) -> float | None:
        last = len(self.phases) - 1
        return _mean([self._gain(self.R[last][j], self.R[at][j]) for j, at in self._trained() if at < last])

    @property
    def fwt(self) -> float | None:
        if self.baseline is None:
            return None
        return _mean([self._gain(self.R[at - 1][j], self.baseline[j]) for j, at in self._trained() if at >= 1])

    @property
    def forgetting(self) -> dict[str, float]:
        last = len(self.phases) - 1
        return {self.tasks[j]: max(self._gain(self.R[l][j], self.R[last][j]) for l in range(at, last))
                for j, at in self._trained() if at < last}

    @property
    def avg_forgetting(self) -> float | None:
        return _mean(list(self.forgetting.values()))

    def to_dict(self) -> dict:
        """JSON-ready: the inputs (enough to rebuild the report with forgetting_report(**inputs)), the
        numbers, and which paper each follows."""
        return {
            "metric": self.metric, "higher_is_better": self.higher_is_better,
            "tasks": list(self.tasks), "phases": list(self.phases), "R": [list(row) for row in self.R],
            "learned_at": list(self.learned_at),
            "baseline": None if self.baseline is None else list(self.baseline),
            "acc": self.acc, "bwt": self.bwt, "fwt": self.fwt,
            "forgetting": self.forgetting, "avg_forgetting": self.avg_forgetting,
            "definitions": dict(DEFINITIONS),
        }


def forgetting_report(tasks: Sequence[str], phases: Sequence[str], R: Sequence[Sequence[float]],
                      learned_at: Sequence[int | None], baseline: Sequence[float] | None = None,
                      metric: str = "accuracy", higher_is_better: bool = True) -> ForgettingReport:
    """The report for R (rows = phases, columns = tasks); ValueError on ragged or mismatched input."""
    return ForgettingReport(
        tasks=tuple(tasks), phases=tuple(phases),
        R=tuple(_floats(row, f"R[{i}]") for i, row in enumerate(R)),
        learned_at=tuple(learned_at),
        baseline=None if baseline is None else _floats(baseline, "baseline"),
        metric=metric, higher_is_better=higher_is_better)


def render_table(report: ForgettingReport) -> str:
    """A fixed-width table for the terminal or a log: one row per phase (and the baseline), one column per
    task, a '*' on the phase that first trains each task, then the summary numbers."""
    rows = [["phase", *(f"{task} " for task in report.tasks)]]  # the space lines up with the '*' column
    if report.baseline is not None:
        rows.append(["(baseline)", *(_fmt(v) + " " for v in report.baseline)])
    for i, (phase, values) in enumerate(zip(report.phases, report.R)):
        rows.append([phase, *(_fmt(v) + ("*" if report.learned_at[j] == i else " ")
                               for j, v in enumerate(values))])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))])
             for row in rows]
    direction = "higher" if report.higher_is_better else "lower"
    lines += [
        f"{report.metric} ({direction} is better); * = phase that first trains the task",
        f"ACC {_fmt(report.acc)}  BWT {_fmt(report.bwt)}  FWT {_fmt(report.fwt)}  "
        f"avg forgetting {_fmt(report.avg_forgetting)}",
    ]
    if report.forgetting:
        lines.append("forgetting: " + ", ".join(f"{t} {_fmt(f)}" for t, f in report.forgetting.items()))
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, report: ForgettingReport) -> list[Path]:
    """Write forgetting.json and, if matplotlib is installed (optional), forgetting.png into run_dir, each
    atomically (a reader never sees half a file); returns the paths written."""
    written = [_write_atomic(Path(run_dir) / JSON_FILE,
                             lambda tmp: tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n"))]
    try:  # optional dependency: imported here so the rest of FTL never needs it
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return written
    # A bare Figure on an Agg canvas rather than pyplot: no process-global backend switch, no figure registry.
    fig = Figure(figsize=(max(6.0, 0.8 * len(report.phases) + 3), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = (["baseline"] if report.baseline is not None else []) + list(report.phases)
    for j, task in enumerate(report.tasks):
        values = ([report.baseline[j]] if report.baseline is not None else []) + [row[j] for row in report.R]
        ax.plot(range(len(labels)), values, marker="o", label=task)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_xlabel("after phase")
    ax.set_ylabel(report.metric)
    ax.set_title(f"{report.metric} per task across phases")
    ax.legend(fontsize="small")
    fig.tight_layout()
    written.append(_write_atomic(Path(run_dir) / PNG_FILE, lambda tmp: fig.savefig(tmp, format="png")))
    return written


def _write_atomic(path: Path, write) -> Path:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def _check_shapes(report: ForgettingReport) -> None:
    n_phases, n_tasks = len(report.phases), len(report.tasks)
    if n_phases == 0 or n_tasks == 0:
        raise ValueError(f"forgetting report: need at least one phase and one task, got {n_phases} phases "
                         f"and {n_tasks} tasks")
    for kind, names in (("task", report.tasks), ("phase", report.phases)):
        if len(set(names)) != len(names):  # forgetting is keyed by task name; the table and plot by both
            raise ValueError(f"forgetting report: {kind} names must be unique, got {list(names)}")
    if len(report.R) != n_phases:
        raise ValueError(f"forgetting report: R has {len(report.R)} rows but there are {n_phases} phases "
                         f"{list(report.phases)}; R needs one row per phase")
    for i, row in enumerate(report.R):
        if len(row) != n_tasks:
            raise ValueError(f"forgetting report: R[{i}] (phase {report.phases[i]!r}) has {len(row)} values but "
                             f"there are {n_tasks} tasks {list(report.tasks)}; every row needs one per task")
    if len(report.learned_at) != n_tasks:
        raise ValueError(f"forgetting report: learned_at has {len(report.learned_at)} entries for {n_tasks} "
                         f"tasks; give one per task (None for a task no phase trains)")
    for j, at in enumerate(report.learned_at):
        if at is not None and (not isinstance(at, int) or isinstance(at, bool) or not 0 <= at < n_phases):
            raise ValueError(f"forgetting report: learned_at[{j}] (task {report.tasks[j]!r}) is {at!r}; it must "
                             f"be a phase index in 0..{n_phases - 1} or None")
    if report.baseline is not None and len(report.baseline) != n_tasks:
        raise ValueError(f"forgetting report: baseline has {len(report.baseline)} values for {n_tasks} tasks; "
                         f"give one per task or none")


def _floats(values: Sequence[float], where: str) -> tuple[float, ...]:
    """Finite floats: a NaN or inf would silently poison every mean (and JSON has no NaN)."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"forgetting report: {where} must be a list of numbers, got {values!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"forgetting report: {where} has a non-finite value {list(out)}; evaluate again or "
                         f"leave the task out")
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
