"""Per-phase LR cycles of a continual job (`data.phases[*].lr` / `warmup_steps`): the LR the optimizer
actually holds at each step, through the scheduler the trainer builds; and the spec's refusal of a
phase whose warmup does not fit it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from launcher.errors import FTLError
from launcher.modeling import build_scheduler
from launcher.schedule import Schedule
from launcher.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
CONTINUAL = REPO / "configs/continual.yaml"


def lrs(spec, groups=(1.0, 0.1)) -> list[list[float]]:
    """Each step's LR per param group (a head at full LR, a body at 0.1), as the trainer's loop reads it."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in groups]
    optimizer = torch.optim.AdamW([{"params": [p], "lr": spec.train.lr * g} for p, g in zip(params, groups)])
    scheduler = build_scheduler(optimizer, spec.train, Schedule.from_spec(spec).phases)
    seen = []
    for _ in range(spec.train.max_steps):
        seen.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    return seen


def test_each_phase_rewarms_to_its_own_peak_and_decays_over_its_steps():
    spec = load_spec(CONTINUAL, ["data.phases.1.lr=1e-3", "data.phases.1.warmup_steps=20", "train.min_lr_ratio=0.1"])
    seen = lrs(spec)
    head = [s[0] for s in seen]
    # phase 1 (steps 1-150): train.lr 3e-3 with train.warmup_steps 10; phase 2 (151-300): 1e-3, warmup 20
    assert head[0] == 0.0 and head[10] == pytest.approx(3e-3)
    assert head[149] == pytest.approx(3e-4, rel=0.01)  # decayed to min_lr_ratio by the phase's end
    assert head[150] == 0.0 and head[170] == pytest.approx(1e-3)  # re-warmed from 0 to the phase's own peak
    assert head[299] == pytest.approx(1e-4, rel=0.01)
    assert all(b == pytest.approx(0.1 * h) for h, b in seen)  # the body's ratio holds in every phase


def test_without_phase_settings_one_schedule_spans_the_phases():
    spec = load_spec(CONTINUAL, [])
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=spec.train.lr)
    expected = get_cosine_with_min_lr_schedule_with_warmup(reference, spec.train.warmup_steps, spec.train.max_steps, min_lr_rate=spec.train.min_lr_ratio)
    want = []
    for _ in range(spec.train.max_steps):
        want.append(expected.get_last_lr()[0])
        reference.step()
        expected.step()
    assert [s[0] for s in lrs(spec, groups=(1.0,))] == want


def test_a_phase_warmup_that_does_not_fit_is_named():
    with pytest.raises(FTLError, match=r"data\.phases\.1\.warmup_steps"):
        load_spec(CONTINUAL, ["data.phases.1.lr=1e-3", "data.phases.1.warmup_steps=150"])
    with pytest.raises(FTLError, match=r"train\.warmup_steps \(its default\)"):
        load_spec(CONTINUAL, ["data.phases.0.lr=1e-3", "data.phases.0.steps=5", "data.phases.1.steps=295"])
