"""`ftl sweep --to ray` on a real two-node Ray (tests/ray/start-local-ray.sh: 1 CPU per node): a 2 x 2 grid of
the quickstart runs as one Ray job whose Ray Tune trials each fit a one-worker TorchTrainer, two trials at a
time (one worker set per node), every point to its last step with a checkpoint; the job prints and writes the
results table, `ftl sweep-status` reads the sweep, and no placement group is left behind. A group the job
itself left is found and removed. How many trials fit at once is whole worker sets per node."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import subprocess
import sys
import textwrap

import pytest

from cluster.ray import read_ledger, submission_id
from cluster.ray_sweep import concurrent_trials, render_table
from tests.cluster.ray_fixture import LocalRay, placement_groups
from tests.conftest import run_ftl

GRID = ["train.lr=1e-3,3e-3", "train.seed=0,1"]
SETTINGS = ["train.lr=1e-3 train.seed=0", "train.lr=1e-3 train.seed=1", "train.lr=3e-3 train.seed=0", "train.lr=3e-3 train.seed=1"]


def job_status(ray: LocalRay, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray.address).get_job_status(sid).value


def job_logs(ray: LocalRay, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray.address).get_job_logs(sid)


def wait_ended(ray: LocalRay, sid: str, timeout_s: float) -> str:
    end = time.monotonic() + timeout_s
    while (status := job_status(ray, sid)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < end, f"timed out after {timeout_s} s waiting for Ray job {sid}"
        time.sleep(1)
    return status


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of the (start, end) intervals that overlap at one moment."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


@pytest.mark.slow
def test_two_by_two_sweep_runs_as_tune_trials_two_at_a_time(tmp_path: Path, local_ray: LocalRay) -> None:
    started = time.monotonic()
    sweep_dir = tmp_path / "sweep"
    submitted = run_ftl(
        "sweep", "configs/quickstart.yaml", f"output_dir={sweep_dir}", "train.max_steps=20", "train.warmup_steps=2",
        "checkpoint.every=0", "train.log_every=5", "hardware.gpus_per_node=1", "--to", "ray", "--grid", *GRID,
        env=local_ray.env,
    )
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-3000:]
    sid = submission_id(sweep_dir)
    assert sid in submitted.stdout and f"ftl sweep-status {sweep_dir}" in submitted.stdout, submitted.stdout
    assert "up to 2 at once" in submitted.stdout, submitted.stdout  # two 1-CPU nodes, one 1-CPU worker per trial
    assert [e["event"] for e in read_ledger(sweep_dir)] == ["submitted"]

    status = wait_ended(local_ray, sid, timeout_s=300)
    logs = job_logs(local_ray, sid)
    assert status == "SUCCEEDED", logs[-5000:]

    for index in range(4):
        outcome = json.loads((sweep_dir / f"point-{index}" / "outcome.json").read_text())
        assert outcome["outcome"] == "done" and outcome["step"] == 20, outcome
        assert (sweep_dir / f"point-{index}" / "checkpoints" / "step-20" / "manifest.json").is_file()

    rows = json.loads((sweep_dir / "sweep-results.json").read_text())
    assert [r["settings"] for r in rows] == SETTINGS
    assert all(r["outcome"] == "done" and r["step"] == 20 for r in rows), rows
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["best_val_loss"]) for r in rows), rows
    # The table in the job's log: its header, then one line per point with its settings and outcome.
    assert re.search(r"point\s+settings\s+step\s+loss\s+best val_loss\s+outcome", logs), logs[-3000:]
    for row in rows:
        assert re.search(rf"{row['point']}\s+{re.escape(row['settings'])}\s+20\s+{row['loss']:.4f}\s+\S+\s+done", logs), row
    assert "4/4 points done" in logs
    assert "FTL sweep on Ray: 4 points, 1 worker(s) of {'CPU': 1.0} per trial; 2 trial(s) fit the cluster at once" in logs

    # Two trials ran at once, never more: each trial's start and end, from the results.
    assert most_at_once([(r["started_at"], r["ended_at"]) for r in rows]) == 2, rows

    sweep_status = run_ftl("sweep-status", str(sweep_dir), env=local_ray.env)
    assert sweep_status.returncode == 0, sweep_status.stderr
    lines = sweep_status.stdout.splitlines()
    assert f"Ray job {sid}: SUCCEEDED" in sweep_status.stdout
    for settings in SETTINGS:
        assert any(settings in line and re.search(r"\bdone\b.*\b20\b.*\b20\b", line) for line in lines), sweep_status.stdout

    left = [g for g in placement_groups(local_ray.address) if g.state != "REMOVED"]
    assert not left, [(g.placement_group_id, g.name, g.state) for g in left]
    print(f"2 x 2 Ray sweep: {time.monotonic() - started:.0f} s from submit to checked")


@pytest.mark.slow
def test_a_placement_group_the_job_left_is_removed(local_ray: LocalRay) -> None:
    code = f"""
        import json, ray
        from ray.util.placement_group import placement_group
        from cluster.ray_sweep import remove_leftover_placement_groups

        ray.init(address={local_ray.gcs_address!r}, log_to_driver=False)
        group = placement_group([{{"CPU": 1}}])  # what a trial or worker group leaks (ray#54305)
        ray.get(group.ready(), timeout=60)
        removed = remove_leftover_placement_groups(ray.get_runtime_context().get_job_id(), settle_s=0)
        print(json.dumps({{"group": group.id.hex(), "removed": removed}}))
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=local_ray.env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["removed"] == [seen["group"]]
    assert {g.placement_group_id: g.state for g in placement_groups(local_ray.address)}[seen["group"]] == "REMOVED"


def test_trials_at_once_are_whole_worker_sets_per_node() -> None:
    cpu = {"CPU": 1.0}
    assert concurrent_trials([{"CPU": 1.0}, {"CPU": 1.0}], workers=1, per_worker=cpu) == 2
    assert concurrent_trials([{"CPU": 1.0}, {"CPU": 1.0}], workers=2, per_worker=cpu) == 1
    assert concurrent_trials([{"CPU": 1.5}, {"CPU": 1.5}], workers=3, per_worker=cpu) == 0  # no worker spans two nodes
    gpu = {"CPU": 8.0, "GPU": 1.0}
    nodes = [{"CPU": 64.0, "GPU": 8.0}, {"CPU": 64.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 4.0}]
    assert concurrent_trials(nodes, workers=4, per_worker=gpu) == 4  # 8 + 8 + 2 (CPU-bound) workers
    assert concurrent_trials([{"CPU": 128.0}], workers=1, per_worker=gpu) == 0  # no GPU


def test_results_table_is_plain_text_with_one_line_per_point() -> None:
    rows = [
        {"point": 0, "settings": "train.lr=1e-3", "step": 20, "loss": 3.96, "best_val_loss": None, "outcome": "done"},
        {"point": 1, "settings": "train.lr=3e-3", "step": 7, "loss": float("nan"), "best_val_loss": 3.2, "outcome": "failed"},
    ]
    assert render_table(rows).splitlines() == [
        "point  settings       step  loss    best val_loss  outcome",
        "-----  -------------  ----  ------  -------------  -------",
        "0      train.lr=1e-3  20    3.9600  -              done",
        "1      train.lr=3e-3  7     -       3.2000         failed",
    ]
