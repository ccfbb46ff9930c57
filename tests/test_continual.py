"""Continual fine-tuning on 2 CPU ranks (configs/continual.yaml: reverse, then sort, on the same digit
sequences): without replay the first task is forgotten, with 20% replay clearly less; the accuracy matrix
R and the forgetting numbers in forgetting.json agree with the phase-end evaluations logged; a pause at a
phase boundary resumes into the next phase with R kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import metric_records, run_ftl

pytestmark = pytest.mark.slow
STEPS = ["data.phases.0.steps=100", "data.phases.1.steps=100", "train.max_steps=200", "hardware.device=cpu", "train.log_every=20", "checkpoint.export_final=false"]


def run(tmp_path: Path, name: str, *overrides: str) -> Path:
    out = tmp_path / name
    result = run_ftl("run", "configs/continual.yaml", f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", *STEPS, *overrides)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out


def test_replay_reduces_forgetting_and_the_report_matches_the_evaluations(tmp_path: Path) -> None:
    plain = json.loads((run(tmp_path, "no-replay", "data.phases.1.replay=0") / "forgetting.json").read_text())
    paused = run(tmp_path, "replay", "train.stop_at=100")  # pauses at the end of phase 1
    assert len(json.loads((paused / "forgetting.json").read_text())["R"]) == 1  # one phase done so far
    resumed = run(tmp_path, "replay")
    replay = json.loads((resumed / "forgetting.json").read_text())

    r_plain, r_replay = plain["R"], replay["R"]
    assert r_plain[0][0] > 0.7 and r_replay[0][0] > 0.7, (r_plain, r_replay)  # the first task was learned (from ~0)
    dropped_plain, dropped_replay = r_plain[0][0] - r_plain[1][0], r_replay[0][0] - r_replay[1][0]
    assert dropped_plain > 0.1, r_plain  # forgotten without replay
    assert dropped_replay < dropped_plain / 2, (r_plain, r_replay)  # clearly less with 20% replay
    assert r_plain[1][1] > 0.7 and r_replay[1][1] > 0.7, (r_plain, r_replay)  # the second task learned either way

    # The report is the phase-end evaluations, rows and columns in order; BWT and forgetting follow from R.
    records = metric_records(resumed)
    ends = [r for r in records if r.get("event") == "phase_end"]
    assert [r["step"] for r in ends] == [100, 200]  # the pause did not evaluate phase 1 twice
    assert [[e["reverse/token_accuracy"], e["sort/token_accuracy"]] for e in ends] == r_replay
    assert replay["bwt"] == pytest.approx(r_replay[1][0] - r_replay[0][0])
    assert replay["forgetting"]["reverse"] == pytest.approx(r_replay[0][0] - r_replay[1][0])
    assert [r["step"] for r in records if r.get("event") == "resumed"] == [100]
    phases = [r for r in records if r.get("event") == "phase"]
    assert phases[-1]["detail"].startswith("phase sort: steps 101..200 on sort (80%), reverse (20%)")
    assert any("loss/reverse" in r for r in records if r.get("step", 0) > 100)  # the replayed source's own loss
