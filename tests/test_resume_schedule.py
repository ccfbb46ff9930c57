"""Resuming with a changed `train.max_steps` or `train.lr`: the LR follows the new spec's schedule from the checkpoint on
(as a fresh run of that spec would), and the run says so once, with the saved and the new LR."""

from __future__ import annotations

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from tests.conftest import metric_records, run_ftl, tiny_spec, write_spec

LR, WARMUP = 1e-3, 1


def fresh_lrs(max_steps: int, lr: float = LR) -> dict[int, float]:
    """The LR of each step (1-based) of a fresh run of `max_steps`, from transformers' schedule."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = get_cosine_with_min_lr_schedule_with_warmup(optimizer, WARMUP, max_steps, min_lr_rate=0.1)
    lrs = {}
    for step in range(1, max_steps + 1):
        lrs[step] = sched.get_last_lr()[0]
        optimizer.step()
        sched.step()
    return lrs


def test_resume_with_more_steps_and_another_lr_follows_the_new_schedule_and_says_so(tmp_path):
    spec = tiny_spec(tmp_path, train={"max_steps": 4, "warmup_steps": WARMUP, "lr": LR, "log_every": 1})
    path = write_spec(tmp_path, spec)
    first = run_ftl("run", str(path), timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_ftl("run", str(path), "train.max_steps=6", "train.lr=2e-3", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]

    records = metric_records(tmp_path / "run")
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r and "event" not in r}
    assert [lrs[s] for s in (1, 2, 3, 4)] == [fresh_lrs(4)[s] for s in (1, 2, 3, 4)]
    assert [lrs[s] for s in (5, 6)] == [fresh_lrs(6, 2e-3)[s] for s in (5, 6)]  # as a fresh run of the new spec, from step 5 on
    [notice] = [r for r in records if r.get("event") == "lr_schedule"]
    assert notice["step"] == 4
    assert "train.max_steps 4 -> 6" in notice["detail"] and "train.lr 0.001 -> 0.002" in notice["detail"] and "from step 5" in notice["detail"]
    assert notice["lr_saved"] == pytest.approx(LR * 0.1)  # the 4-step schedule had ended at its minimum
    assert notice["lr"] == fresh_lrs(6, 2e-3)[5]
    assert "event=lr_schedule" in again.stdout + again.stderr
