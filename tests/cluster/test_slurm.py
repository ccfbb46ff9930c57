"""`ftl submit --to slurm` on a real Slurm (two slurmd on this machine, tests/slurm/start-local-slurm.sh):
the job runs through sbatch, srun and torchrun and completes; two nodes form one rendezvous; a USR2 to the
batch script ends in a checkpoint, a requeue and an exact resume; crashes stop being requeued once the
failure budget is spent; a 2 x 2 sweep is one job array; and nothing in a hostile run name is executed by
the script."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from cluster.slurm import SlurmOptions, read_ledger, render_sbatch
from launcher.job import RankJob
from tests.cluster.test_local_slurm import job_state, local_slurm, wait_until  # noqa: F401 (fixture)
from tests.conftest import REPO, logged_losses, metric_records as _records, run_ftl, tiny_spec, write_spec

pytestmark = pytest.mark.slow


def submit(tmp_path: Path, env: dict[str, str], name: str = "run", *flags: str, **sections) -> tuple[str, Path]:
    sections.setdefault("hardware", {"gpus_per_node": 2})
    spec = tiny_spec(tmp_path, output_dir=str(tmp_path / name), **sections)
    result = run_ftl("submit", str(write_spec(tmp_path, spec, f"{name.replace('/', '_')}.yaml")), "--to", "slurm", *flags, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = [e for e in read_ledger(Path(spec["output_dir"])) if e["event"] == "submitted"][-1]["job_id"]
    return job_id, Path(spec["output_dir"])


def wait_done(env: dict[str, str], job_id: str, run_dir: Path, timeout_s: float = 240) -> str:
    """Until the job has ended for good (COMPLETED / FAILED, not a requeued attempt)."""
    wait_until(lambda: job_state(env, job_id) in ("COMPLETED", "FAILED", "CANCELLED"), timeout_s, f"job {job_id} to end")
    return job_state(env, job_id)


def metric_records(run_dir: Path) -> list[dict]:
    """The run's records so far ([] before the first rank has started)."""
    return _records(run_dir) if (run_dir / "metrics.jsonl").is_file() else []


def log_of(run_dir: Path, job_id: str) -> str:
    return (run_dir / f"slurm-{job_id}.out").read_text(errors="replace")


def test_submitted_job_completes_on_two_nodes_and_status_reports_it(tmp_path: Path, local_slurm: dict) -> None:
    """One job checks what two jobs did (~25 s each here): a job completes and `ftl status` / `ftl logs` report
    it, and 2 nodes x 1 process form one rendezvous."""
    job_id, run_dir = submit(tmp_path, local_slurm, hardware={"gpus_per_node": 1, "nodes": 2}, train={"max_steps": 30, "log_every": 1, "lr": 3e-3})
    assert wait_done(local_slurm, job_id, run_dir) == "COMPLETED", log_of(run_dir, job_id)[-3000:]
    losses = logged_losses(run_dir)
    assert sorted(losses) == list(range(1, 31)) and losses[30] < losses[1]
    log = log_of(run_dir, job_id)
    assert "on 2 node(s) (node[1-2])" in log
    assert "ddp on 2 x cpu" in log  # world size = 2 nodes x 1 process
    assert (run_dir / "job.sbatch").is_file()
    for target in (str(run_dir), job_id):  # by run dir or by job id
        status = run_ftl("status", target, env=local_slurm)
        assert status.returncode == 0 and "COMPLETED" in status.stdout and "30 / 30" in status.stdout, status.stdout
    logs = run_ftl("logs", job_id, "--follow", env=local_slurm)  # the job has ended: prints it all and returns
    assert "FTL: done" in logs.stdout and "attempt ended: completed" in logs.stdout


def test_preemption_checkpoints_requeues_and_resumes_exactly_and_a_hostile_name_runs_nothing(tmp_path: Path, local_slurm: dict) -> None:
    """The run dir's name is HOSTILE (quoted into the batch script, the step and the requeued attempt): nothing
    in it is executed. (That check paid a Slurm job of its own.)"""
    job_id, run_dir = submit(tmp_path, local_slurm, HOSTILE, train={"max_steps": 400, "log_every": 1}, checkpoint={"every": 100})
    assert run_dir.name == HOSTILE
    wait_until(lambda: any(r.get("step", 0) >= 20 for r in metric_records(run_dir)), 120, "step 20")
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True, env=local_slurm)
    assert wait_done(local_slurm, job_id, run_dir, timeout_s=300) == "COMPLETED", log_of(run_dir, job_id)[-3000:]

    ends = [e for e in read_ledger(run_dir) if e["event"] == "ended"]
    assert [e["cause"] for e in ends] == ["preempted", "completed"], ends
    saved = ends[0]["step"]
    assert 20 <= saved < 400 and ends[0]["decision"] == "requeue" and ends[1]["restart"] == 1
    steps = [r["step"] for r in metric_records(run_dir) if "loss" in r]
    assert steps == list(range(1, 401)), "every step exactly once: none lost, none after the saved one run twice"
    assert f"resumed from {run_dir}/checkpoints/step-{saved}" in log_of(run_dir, job_id)
    for where in (run_dir, run_dir.parent, Path.cwd()):  # the script's and the step's working directories
        assert not (where / "PWNED").exists() and not (where / "PWNED2").exists()


def test_crashes_stop_being_requeued_when_the_budget_is_spent(tmp_path: Path, local_slurm: dict) -> None:
    job_id, run_dir = submit(
        tmp_path, local_slurm, "crashy", "--max-failures", "2", train={"max_steps": 100000, "log_every": 1}, checkpoint={"every": 0}
    )
    for attempt in range(2):  # kill a rank mid-run: a real crash, not a stop request
        wait_until(lambda: len(ended(run_dir)) == attempt and _rank_pids(run_dir), 120, f"attempt {attempt + 1} running")
        wait_until(lambda: any(r.get("step", 0) >= 3 for r in metric_records(run_dir)[-3:]), 120, "a few steps")
        os.kill(_rank_pids(run_dir)[0], signal.SIGKILL)
        wait_until(lambda: len(ended(run_dir)) == attempt + 1, 120, f"attempt {attempt + 1} recorded")
    assert wait_done(local_slurm, job_id, run_dir) == "FAILED"
    ends = ended(run_dir)
    assert [e["cause"] for e in ends] == ["failed", "failed"] and ends[0]["decision"] == "requeue"
    assert "failure budget spent" in ends[1]["decision"]
    status = run_ftl("status", str(run_dir), env=local_slurm)
    assert "failure budget spent" in status.stdout, status.stdout


def test_cancel_by_run_dir(tmp_path: Path, local_slurm: dict) -> None:
    job_id, run_dir = submit(tmp_path, local_slurm, train={"max_steps": 100000, "log_every": 1})
    wait_until(lambda: any(r.get("step", 0) >= 3 for r in metric_records(run_dir)), 120, "training to start")
    result = run_ftl("cancel", str(run_dir), env=local_slurm)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: job_state(local_slurm, job_id) == "CANCELLED", 90, "the job to be cancelled")
    wait_until(lambda: not _rank_pids(run_dir), 60, "the ranks to exit")
    assert [e["event"] for e in read_ledger(run_dir)][:2] == ["submitted", "cancelled"]
    assert all(e.get("decision", "stop").startswith("stop") for e in read_ledger(run_dir)), "a cancelled job is never requeued"


def ended(run_dir: Path) -> list[dict]:
    return [e for e in read_ledger(run_dir) if e["event"] == "ended"]


def _rank_pids(run_dir: Path) -> list[int]:
    """The rank processes of the run (not torchrun, whose command line ends the same way)."""
    found = subprocess.run(["pgrep", "-f", f"launcher.train --run-dir {run_dir}$"], capture_output=True, text=True)
    ranks = []
    for pid in found.stdout.split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"torch.distributed.run" not in cmdline and b"cluster.torchrun" not in cmdline:
            ranks.append(int(pid))
    return ranks


def test_a_two_by_two_sweep_is_one_array_with_four_run_dirs(tmp_path: Path, local_slurm: dict) -> None:
    spec = tiny_spec(
        tmp_path, output_dir=str(tmp_path / "sweep"), hardware={"gpus_per_node": 2},
        data={"validation": str(REPO / "configs/data/quickstart-val.jsonl")}, train={"max_steps": 8, "log_every": 1},
    )
    result = run_ftl(
        "sweep", str(write_spec(tmp_path, spec)), "--to", "slurm", "--grid", "train.lr=1e-3,3e-3", "train.seed=1,2",
        "--max-parallel", "2", env=local_slurm,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert "#SBATCH --array=0-3%2" in (sweep / "job.sbatch").read_text()
    job_ids = [read_ledger(sweep / f"point-{i}")[0]["job_id"] for i in range(4)]
    array_id = job_ids[0].split("_")[0]
    assert job_ids == [f"{array_id}_{i}" for i in range(4)]  # one array, one task per point
    for i, job_id in enumerate(job_ids):
        assert wait_done(local_slurm, job_id, sweep / f"point-{i}") == "COMPLETED"
    settings = [RankJob.read(sweep / f"point-{i}").spec.train for i in range(4)]
    assert [(t.lr, t.seed) for t in settings] == [(1e-3, 1), (1e-3, 2), (3e-3, 1), (3e-3, 2)]
    point = run_ftl("status", job_ids[3], env=local_slurm)  # an array task's id finds its own point
    assert job_ids[3] in point.stdout and "8 / 8" in point.stdout and "completed at step 8" in point.stdout, point.stdout
    status = run_ftl("sweep-status", str(sweep), env=local_slurm)
    rows = [line for line in status.stdout.splitlines() if "train.lr=" in line]
    assert len(rows) == 4 and all("COMPLETED" in row for row in rows), status.stdout
    assert all(re.search(r"\b\d\.\d{4}\b", row) for row in rows), "each row shows its best validation loss"


HOSTILE = 'my run; $(touch PWNED) `touch PWNED2` "q\' & x'


def test_rendered_script_is_concrete_and_quoted(tmp_path: Path) -> None:
    script = render_sbatch(
        tmp_path / HOSTILE, nodes=4, ranks_per_node=8, device="cuda", save_grace_s=90,
        options=SlurmOptions(partition="gpu", account="proj-1", time="1-02:00:00", exclusive=True, container_image="nvcr.io#nvidia/pytorch:24.05-py3"),
        python="/opt/venv/bin/python",
    )
    assert "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=8\n#SBATCH --cpus-per-task=64\n" in script
    assert "#SBATCH --signal=B:USR2@120\n" in script  # at least 120 s, whatever the plan's save time
    assert "#SBATCH --partition=gpu\n#SBATCH --account=proj-1\n#SBATCH --exclusive\n" in script
    assert "--container-image='nvcr.io#nvidia/pytorch:24.05-py3'" in script
    assert "{{" not in script and "}}" not in script
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    with pytest.raises(Exception, match="not a Slurm partition name"):
        render_sbatch(tmp_path, 1, 1, "cpu", 60, SlurmOptions(partition="gpu; rm -rf /"))
