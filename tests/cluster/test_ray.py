"""`ftl submit --to ray` on a real two-node Ray (tests/ray/start-local-ray.sh: a head and a second node on
this machine, 1 CPU each, loopback only): a 2-worker job spreads over both nodes, `ftl cancel` ends it at a
checkpoint and a resubmission of the same job continues it; a worker killed with SIGKILL and a whole node
removed are survived with the loss after the resume equal to an uninterrupted run's; a pre-emption notice
from Ray saves a checkpoint at once and training goes on; LoRA and QLoRA run;
mistakes (a working dir over Ray's upload limit, more workers than the cluster has) are refused before
anything is written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.ray import read_ledger, submission_id
from tests.cluster.ray_fixture import LocalRay
from tests.conftest import REPO, logged_losses, metric_records, run_ftl, tiny_spec, wait_until, write_spec

pytestmark = pytest.mark.slow


def ray_job(tmp_path: Path, name: str, max_steps: int, every: int, **sections) -> Path:
    """A tiny 2-worker CPU job logging every step, ~10 steps/s here (slow enough to act on mid-run)."""
    spec = tiny_spec(
        tmp_path,
        train={"max_steps": max_steps, "log_every": 1, "lr": 3e-3, "collective_timeout_s": 60, "micro_batch_size": 8, "seq_len": 128},
        hardware={"gpus_per_node": 2},
        checkpoint={"every": every, "keep": 2},
        output_dir=str(tmp_path / name),
        **sections,
    )
    return write_spec(tmp_path, spec, f"{name}.yaml")


def submit(job: Path, ray: LocalRay, *flags: str) -> Path:
    result = run_ftl("submit", str(job), "--to", "ray", *flags, env=ray.env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run_dir = Path(re.search(r"-> (\S+)", result.stdout).group(1))
    assert submission_id(run_dir) in result.stdout
    return run_dir


def job_status(ray: LocalRay, run_dir: Path) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray.address).get_job_status(submission_id(run_dir)).value


def job_logs(ray: LocalRay, run_dir: Path) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray.address).get_job_logs(submission_id(run_dir))


def wait_ended(ray: LocalRay, run_dir: Path, timeout_s: float = 240) -> str:
    wait_until(lambda: job_status(ray, run_dir) in ("SUCCEEDED", "FAILED", "STOPPED"), timeout_s, f"the Ray job of {run_dir}")
    (run_dir / "ray-job.log").write_text(job_logs(ray, run_dir))  # kept for a failing test's reader
    return job_status(ray, run_dir)


def reached(run_dir: Path, step: int) -> bool:
    return (run_dir / "metrics.jsonl").is_file() and any(r.get("step", 0) >= step and "loss" in r for r in metric_records(run_dir))


def train_workers(ray: LocalRay, state: str | None = "ALIVE") -> list:
    """Ray's records of the RayTrainWorker actors (pid, node_id), alive ones by default."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker")] + ([("state", "=", state)] if state else [])
    return list_actors(address=ray.address, filters=filters, detail=True, limit=1000, raise_on_missing_output=False)


def resumed_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in metric_records(run_dir) if r.get("event") == "resumed"]


def test_job_spreads_over_two_nodes_cancel_saves_and_resubmission_continues(tmp_path: Path, local_ray: LocalRay) -> None:
    steps = 200  # `ftl cancel` lands ~3 s (~45 steps) after step 8: ~10 s to spare, and steps left to resume
    job = ray_job(tmp_path, "run", max_steps=steps, every=100)
    run_dir = submit(job, local_ray)
    wait_until(lambda: reached(run_dir, 8), 180, "step 8")
    nodes = {w.node_id for w in train_workers(local_ray)}
    assert len(nodes) == 2, f"the 2 workers share a node: {nodes}"
    # A second submission of a running job is refused by the preflight `ftl submit --to ray` runs before it
    # writes anything (asked in-process: the job takes ~20 s, a CLI start would race it).
    from cluster.ray import check_not_running
    from launcher.errors import FTLError

    with pytest.raises(FTLError, match="is still RUNNING"):
        check_not_running(run_dir, local_ray.address)

    cancel = run_ftl("cancel", str(run_dir), env=local_ray.env)
    assert cancel.returncode == 0, cancel.stderr
    assert wait_ended(local_ray, run_dir) == "FAILED"  # the entrypoint exits 75: pre-empted, checkpoint saved
    outcome = json.loads((run_dir / "outcome.json").read_text())
    stopped = outcome["step"]
    assert outcome["outcome"] == "preempted" and "ftl cancel" in outcome["detail"], outcome
    assert (run_dir / "checkpoints" / f"step-{stopped}" / "manifest.json").is_file() and stopped < steps
    assert "resubmit to continue (exit 75)" in job_logs(local_ray, run_dir)

    again = submit(job, local_ray)  # the same job: the same Ray job id, continued
    assert again == run_dir
    assert wait_ended(local_ray, run_dir) == "SUCCEEDED", job_logs(local_ray, run_dir)[-3000:]
    assert resumed_steps(run_dir) == [stopped]
    losses = logged_losses(run_dir)
    assert sorted(losses) == list(range(1, steps + 1)) and losses[steps] < losses[1]
    assert (run_dir / f"ray-{submission_id(run_dir)}-attempt1.log").read_text().count("ftl cancel") >= 1  # the first attempt's log kept
    assert [e["event"] for e in read_ledger(run_dir)] == ["submitted", "cancelled", "submitted"]
    status = run_ftl("status", str(run_dir), env=local_ray.env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and f"{steps} / {steps}" in status.stdout, status.stdout
    by_id = run_ftl("logs", submission_id(run_dir), env=local_ray.env)
    assert by_id.returncode == 0 and f"FTL on Ray: done at step {steps}" in by_id.stdout, by_id.stderr


def test_killed_worker_resumes_with_exact_losses(tmp_path: Path, local_ray: LocalRay) -> None:
    steps = 60  # the kill lands at ~step 26 (rank 1 is found before step 25): ~30 steps to spare
    job = ray_job(tmp_path, "killed", max_steps=steps, every=20)
    run_dir = submit(job, local_ray, "--max-failures", "1")
    wait_until(lambda: reached(run_dir, 2), 180, "step 2")  # the workers are up and have logged their ranks
    rank1 = [w for w in train_workers(local_ray) if f"pid={w.pid})" in job_logs(local_ray, run_dir) and "world_rank=1" in _worker_line(local_ray, run_dir, w.pid)]
    assert len(rank1) == 1, "rank 1's worker not found"
    wait_until(lambda: reached(run_dir, 25), 180, "step 25")
    assert not reached(run_dir, steps), "the run ended before the kill"
    os.kill(rank1[0].pid, signal.SIGKILL)
    assert wait_ended(local_ray, run_dir) == "SUCCEEDED", job_logs(local_ray, run_dir)[-4000:]
    resumed = resumed_steps(run_dir)
    assert len(resumed) == 1 and 20 <= resumed[0] < steps, resumed
    assert f"resumed from {run_dir}/checkpoints/step-{resumed[0]}" in job_logs(local_ray, run_dir)

    # The same job run uninterrupted, by torchrun: the same loop, so the same losses, bit for bit.
    reference = tmp_path / "reference"
    plain = run_ftl("run", str(job), f"output_dir={reference}", "--no-resume")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert logged_losses(run_dir) == logged_losses(reference)


def _worker_line(ray: LocalRay, run_dir: Path, pid: int) -> str:
    """Ray Train's line naming a worker's rank: `- (ip=..., pid=PID) world_rank=R, ...`."""
    return next((line for line in job_logs(ray, run_dir).splitlines() if f"pid={pid})" in line and "world_rank=" in line), "")


def test_node_removed_mid_run_resumes_when_it_is_back(tmp_path: Path, local_ray: LocalRay) -> None:
    steps = 150  # node2 goes at ~step 31; the 119 steps left are ~12 s to spare, and a resume from 25 or 50
    job = ray_job(tmp_path, "node", max_steps=steps, every=25)
    run_dir = submit(job, local_ray, "--max-failures", "1")
    wait_until(lambda: reached(run_dir, 30), 180, "step 30")
    started = time.monotonic()
    local_ray.kill_node2()  # the machine is gone, its worker with it
    time.sleep(3)
    local_ray.start_node2()  # a replacement node joins, as an autoscaler would bring one
    assert wait_ended(local_ray, run_dir) == "SUCCEEDED", job_logs(local_ray, run_dir)[-4000:]
    assert time.monotonic() - started < 200  # no attempt hangs until the collective timeout
    resumed = resumed_steps(run_dir)
    assert len(resumed) == 1 and 25 <= resumed[0] < steps, resumed
    assert sorted(logged_losses(run_dir)) == list(range(1, steps + 1))


def test_preemption_notice_saves_a_checkpoint_and_training_goes_on(tmp_path: Path, local_ray: LocalRay) -> None:
    """Ray's notice that node2 will be reclaimed (the drain an autoscaler sends for a spot instance): the ranks
    save at once and keep training; with `max_failures=0` the job still succeeds. (When the node then goes,
    Ray restarts the group from that checkpoint against `max_preemption_failures`: Ray's part, not tested here.)"""
    steps = 200  # the notice lands ~3-6 s (30-60 steps) after step 5: room to spare, and to go on after the save
    job = ray_job(tmp_path, "preempted", max_steps=steps, every=0)
    run_dir = submit(job, local_ray, "--max-failures", "0")
    wait_until(lambda: reached(run_dir, 5), 180, "step 5")
    drain = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "drain-node", "--address", local_ray.gcs_address, "--node-id", local_ray.node_ids()["node2"],
         "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)", "--deadline-remaining-seconds", "900"],
        capture_output=True, text=True, env=local_ray.env,
    )
    assert drain.returncode == 0, drain.stderr
    try:
        assert wait_ended(local_ray, run_dir) == "SUCCEEDED", job_logs(local_ray, run_dir)[-4000:]
    finally:
        local_ray.kill_node2()  # a drained node takes no new work: replace it for the tests after this one
        local_ray.start_node2()
    saved = [r for r in metric_records(run_dir) if r.get("event") == "checkpoint_requested"]
    assert len(saved) == 1 and "about to be pre-empted" in saved[0]["detail"], saved
    assert (run_dir / "checkpoints" / f"step-{saved[0]['step']}" / "manifest.json").is_file()
    assert 5 <= saved[0]["step"] < steps and sorted(logged_losses(run_dir)) == list(range(1, steps + 1)) and not resumed_steps(run_dir)


# qlora only: on Ray it is the lora case (the same PEFT LoRA wrapping, adapter-only checkpoint, and an export
# that reloads the adapters onto a dense base: launcher/export.py treats qlora as lora there) plus the 4-bit
# base, so a `lora` case proved nothing this one does not. Plain LoRA keeps its own tests under torchrun
# (tests/test_methods.py, tests/test_resume.py's lora-ddp).
@pytest.mark.parametrize("method", ["qlora"])
def test_adapter_methods_run_on_ray_and_export(tmp_path: Path, local_ray: LocalRay, method: str) -> None:
    job = ray_job(tmp_path, method, max_steps=20, every=0, method={"name": method, "lora": {"r": 8}})  # ~2 s of steps
    run_dir = submit(job, local_ray)
    assert wait_ended(local_ray, run_dir) == "SUCCEEDED", job_logs(local_ray, run_dir)[-4000:]
    losses = logged_losses(run_dir)
    assert losses[20] < losses[1]
    out = tmp_path / f"{method}-adapter"
    export = run_ftl("export", str(run_dir), "--to", str(out))
    assert export.returncode == 0, export.stderr[-3000:]
    adapter = out / "adapter_model.safetensors"
    assert adapter.stat().st_size > 0 and "reloaded with transformers/peft" in export.stdout

    from peft import PeftConfig

    assert PeftConfig.from_pretrained(out).r == 8


def test_mistakes_are_refused_before_anything_is_written(tmp_path: Path, local_ray: LocalRay) -> None:
    big = tmp_path / "workdir"
    big.mkdir()
    (big / "weights.bin").write_bytes(os.urandom(110 * 2**20))  # incompressible: the package stays over 100 MiB
    job = ray_job(tmp_path, "big", max_steps=5, every=0)
    refused = run_ftl("submit", str(job), "--to", "ray", "--working-dir", str(big), env=local_ray.env)
    assert refused.returncode == 2 and "weights.bin (110.0 MiB)" in refused.stderr and "100 MiB limit" in refused.stderr, refused.stderr
    too_many = run_ftl("submit", str(job), "--to", "ray", "--gpus", "3", env=local_ray.env)
    assert too_many.returncode == 2 and "needs 3 Ray workers" in too_many.stderr and "can place 2" in too_many.stderr, too_many.stderr
    for flags, said in ((["--cpus-per-worker", "0"], "--cpus-per-worker 0"), (["--working-dir", str(tmp_path / "nowhere")], "is not a folder")):
        bad = run_ftl("submit", str(job), "--to", "ray", *flags, env=local_ray.env)
        assert bad.returncode == 2 and said in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "big").exists()


def test_a_mistake_found_by_the_ranks_ends_the_job_with_exit_2(tmp_path: Path, local_ray: LocalRay) -> None:
    """A mistake only the ranks find (the data file emptied after `ftl submit` checked it): every rank stops
    before training, the group ends at once (no collective timeout), the restart Ray makes finds the error
    in outcome.json and returns instead of failing the same way again, and the job exits 2 with the paragraph."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text((REPO / "configs/data/quickstart.jsonl").read_text())
    job = ray_job(tmp_path, "nodata", max_steps=5, every=0, data={"train": str(empty)})
    run_dir = submit(job, local_ray, "--max-failures", "1")
    empty.write_text("")  # the ranks start seconds later: they read it empty
    assert wait_ended(local_ray, run_dir, timeout_s=180) == "FAILED"
    logs = job_logs(local_ray, run_dir)
    assert "error: " in logs and "empty.jsonl" in logs, logs[-3000:]
    assert "exit code 2" in local_ray_message(local_ray, run_dir), logs[-3000:]
    assert json.loads((run_dir / "outcome.json").read_text())["outcome"] == "error"
    assert not logged_losses(run_dir)  # no step was taken


def local_ray_message(ray: LocalRay, run_dir: Path) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray.address).get_job_info(submission_id(run_dir)).message or ""
