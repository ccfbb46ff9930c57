"""launcher/continual.py without a model: each phase's mixture with its replay, the general-capability
watch (alarm once per crossing, stop only when asked), the forgetting report built from phase-end rows."""

from __future__ import annotations

from pathlib import Path

import datasets

from launcher.continual import EvalSets, phase_sources
from launcher.data import Source
from launcher.schedule import Schedule
from launcher.spec import spec_from_dict
from tests.conftest import REPO, tiny_spec

REVERSE, SORT = str(REPO / "configs/data/continual-reverse.jsonl"), str(REPO / "configs/data/continual-sort.jsonl")
VAL = str(REPO / "configs/data/quickstart-val.jsonl")


def continual_spec(tmp_path: Path, replay: float, eval_sets: list[dict]):
    phases = [{"name": "a", "steps": 5, "mixture": [{"name": "reverse", "path": REVERSE}]},
              {"name": "b", "steps": 5, "mixture": [{"name": "sort", "path": SORT}], "replay": replay, "replay_rows": 10}]
    return spec_from_dict(tiny_spec(tmp_path, data={"train": None, "phases": phases, "eval_sets": eval_sets}, train={"max_steps": 10}))


def test_replay_weights_and_reservoir(tmp_path: Path) -> None:
    spec = continual_spec(tmp_path, 0.25, [])
    schedule = Schedule.from_spec(spec)
    by_name = {n: Source(n, 1.0, rows=datasets.Dataset.from_dict({"x": list(range(100))}), stats={}, built=False)
               for n in ("reverse", "sort")}
    assert [(s.name, s.weight) for s in phase_sources(schedule.phases[0], by_name, 0)] == [("reverse", 1.0)]
    second = phase_sources(schedule.phases[1], by_name, 0)
    assert [(s.name, s.weight) for s in second] == [("sort", 0.75), ("reverse", 0.25)]
    assert len(second[1].rows) == 10 and second[1].rows["x"] == phase_sources(schedule.phases[1], by_name, 0)[1].rows["x"]


def test_watch_alarms_once_per_crossing_and_stops_only_when_asked(tmp_path: Path) -> None:
    sets = [{"name": "general", "path": VAL, "watch": True, "max_regression": 0.1},
            {"name": "strict", "path": VAL, "watch": True, "max_regression": 0.1, "stop_on_regression": True}]
    evals = EvalSets(continual_spec(tmp_path, 0.0, sets), {}, evaluate=lambda examples: {})
    evals.baseline = {"general": {"val_loss": 2.0}, "strict": {"val_loss": 2.0}}
    ok = {"general": {"val_loss": 2.1}, "strict": {"val_loss": 1.0}}
    assert evals.watch(ok) == []
    worse = {"general": {"val_loss": 2.3}, "strict": {"val_loss": 1.0}}
    alarms = evals.watch(worse)
    assert len(alarms) == 1 and alarms[0].startswith("general: val_loss 2.3000 is +15.0% over") and not evals.should_stop(alarms)
    assert evals.watch(worse) == []  # still over: no second alarm
    assert evals.watch(ok) == [] and evals.watch(worse) != []  # recovered, then crossed again
    both = evals.watch({"general": {"val_loss": 2.3}, "strict": {"val_loss": 2.5}})
    assert [a.split(":")[0] for a in both] == ["strict"] and evals.should_stop(both)


def test_report_from_phase_end_rows(tmp_path: Path) -> None:
    sets = [{"name": "reverse", "path": VAL}, {"name": "sort", "path": VAL}]
    spec = continual_spec(tmp_path, 0.0, sets)
    evals = EvalSets(spec, {"reverse": {}, "sort": {}}, evaluate=lambda examples: {})
    evals.baseline = {"reverse": {"token_accuracy": 0.0}, "sort": {"token_accuracy": 0.1}}
    evals.rows = [{"reverse": {"token_accuracy": 0.9}, "sort": {"token_accuracy": 0.3}},
                  {"reverse": {"token_accuracy": 0.6}, "sort": {"token_accuracy": 0.8}}]
    report = evals.report(Schedule.from_spec(spec))
    # By hand: ACC = (0.6 + 0.8) / 2; BWT = 0.6 - 0.9; FWT = R[0][sort] - b[sort] = 0.3 - 0.1; forgetting(reverse) = 0.9 - 0.6.
    assert list(report.learned_at) == [0, 1]
    assert abs(report.acc - 0.7) < 1e-9 and abs(report.bwt + 0.3) < 1e-9 and abs(report.fwt - 0.2) < 1e-9
    assert abs(report.forgetting["reverse"] - 0.3) < 1e-9
    table = evals.write(tmp_path, Schedule.from_spec(spec))
    assert "reverse" in table and (tmp_path / "forgetting.json").is_file()
