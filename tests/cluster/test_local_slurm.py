"""A real Slurm runs on this machine (tests/slurm/start-local-slurm.sh): two slurmd nodes take batch jobs,
multi-node steps, a signal to the batch script, and a requeue that runs the job again within seconds.

The fixture `local_slurm` starts the cluster (idempotent: instant when it is up) and leaves it running for
other tests and other users; it skips only where the script cannot work (not root, or neither Slurm nor apt).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_until

START_SCRIPT = REPO / "tests/slurm/start-local-slurm.sh"
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def _cannot_start_reason() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm needs root (it installs packages and runs munged and the Slurm daemons)"
    if not shutil.which("slurmctld", path=SBIN_PATH) and not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def local_slurm() -> dict[str, str]:
    """Start the local Slurm and return the environment its clients need (SLURM_CONF, PATH)."""
    reason = _cannot_start_reason()
    if reason:
        pytest.skip(reason)
    done = subprocess.run(["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"start-local-slurm.sh failed:\n{done.stdout}\n{done.stderr}"
    conf = os.environ.get("FTL_SLURM_DIR", "/tmp/ftl-slurm") + "/slurm.conf"
    return {**os.environ, "SLURM_CONF": conf, "PATH": SBIN_PATH}


def slurm(env: dict[str, str], *argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, f"{' '.join(argv)} failed: {done.stderr}"
    return done.stdout.strip()


def job_state(env: dict[str, str], job_id: str) -> str:
    fields = dict(f.split("=", 1) for f in slurm(env, "scontrol", "show", "job", "-o", job_id).split() if "=" in f)
    return fields["JobState"]


def wait_state(env: dict[str, str], job_id: str, state: str, timeout_s: float = 60) -> None:
    seen = []

    def reached() -> bool:
        seen.append(job_state(env, job_id))
        assert seen[-1] in (state, "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"), (
            f"job {job_id} ended {seen[-1]}, expected {state}"
        )
        return seen[-1] == state

    wait_until(reached, timeout_s, f"job {job_id} to be {state} (last seen {seen[-1:] or 'nothing'})")


def sbatch(env: dict[str, str], tmp_path: Path, *args: str) -> str:
    job_id = slurm(env, "sbatch", "--parsable", "--job-name=ftl-test", f"--output={tmp_path}/%j.out", *args)
    return job_id.split(";")[0]


@pytest.fixture
def jobs(local_slurm):
    """Job ids a test submitted; any still queued or running at the end are cancelled."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        subprocess.run(["scancel", job_id], env=local_slurm, capture_output=True)


def test_both_nodes_are_idle_or_busy(local_slurm):
    states = dict(line.split() for line in slurm(local_slurm, "sinfo", "-h", "-N", "-o", "%N %t").splitlines())
    assert set(states) == {"node1", "node2"}
    assert all(s in ("idle", "mix", "alloc") for s in states.values()), states


def test_batch_job_completes_and_is_listed_after_it_ends(local_slurm, jobs, tmp_path):
    out = tmp_path / "where"
    job_id = sbatch(local_slurm, tmp_path, "--wrap", f'echo "$(hostname) $SLURM_NODEID $SLURMD_NODENAME" > {out}')
    jobs.append(job_id)
    wait_state(local_slurm, job_id, "COMPLETED")
    host, node_id, node_name = out.read_text().split()
    assert (host, node_id) == (os.uname().nodename, "0") and node_name in ("node1", "node2")
    # Without slurmdbd, the job-completion file is what sacct reads.
    listed = slurm(local_slurm, "sacct", "-c", "-n", "-j", job_id)
    assert "COMPLETED" in listed, listed


def test_two_node_job_runs_one_task_on_each_node(local_slurm, jobs, tmp_path):
    job_id = sbatch(
        local_slurm, tmp_path, "-N", "2", "--ntasks-per-node=1",
        "--wrap", 'srun bash -c "echo task \\$SLURM_PROCID \\$SLURMD_NODENAME \\$SLURM_NNODES"',
    )
    jobs.append(job_id)
    wait_state(local_slurm, job_id, "COMPLETED")
    tasks = sorted(l for l in (tmp_path / f"{job_id}.out").read_text().splitlines() if l.startswith("task"))
    assert tasks == ["task 0 node1 2", "task 1 node2 2"]


def test_signal_to_the_batch_script_reaches_its_trap(local_slurm, jobs, tmp_path):
    script = tmp_path / "trap.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"trap 'echo USR2 > {tmp_path}/caught; exit 0' USR2\n"
        f"touch {tmp_path}/ready\n"
        "sleep 300 &\n"
        "wait\n"  # a foreground child would hold the trap until it ends
    )
    job_id = sbatch(local_slurm, tmp_path, str(script))
    jobs.append(job_id)
    wait_until((tmp_path / "ready").exists, 60, "the batch script to install its trap")
    slurm(local_slurm, "scancel", "--signal=USR2", "--batch", job_id)
    wait_state(local_slurm, job_id, "COMPLETED", timeout_s=30)
    assert (tmp_path / "caught").read_text().strip() == "USR2"


def test_requeued_job_runs_again_within_30_s(local_slurm, jobs, tmp_path, capsys):
    runs = tmp_path / "runs"
    script = tmp_path / "requeue.sh"
    script.write_text(f"#!/bin/bash\necho \"run $SLURM_RESTART_COUNT\" >> {runs}\nsleep 300 &\nwait\n")
    job_id = sbatch(local_slurm, tmp_path, "--requeue", str(script))
    jobs.append(job_id)
    wait_until(runs.exists, 60, "the first run")
    slurm(local_slurm, "scontrol", "requeue", job_id)
    delay_s = wait_until(lambda: len(runs.read_text().splitlines()) == 2, 30, "the requeued job to run again")
    with capsys.disabled():
        print(f"\nscontrol requeue -> running again after {delay_s:.1f} s")
    # SLURM_RESTART_COUNT is unset on the first run, 1 on the first restart
    assert runs.read_text().splitlines() == ["run ", "run 1"]


def test_a_job_line_keeps_values_with_spaces():
    from cluster.slurm import parse_job_line

    line = "JobId=7 JobName=ftl-my run JobState=COMPLETED Reason=None WorkDir=/tmp/my run/x StdOut=/tmp/my run/x/slurm-7.out TRES=cpu=2,node=1"
    fields = parse_job_line(line)
    assert fields["WorkDir"] == "/tmp/my run/x" and fields["StdOut"] == "/tmp/my run/x/slurm-7.out"
    assert fields["JobState"] == "COMPLETED" and fields["TRES"] == "cpu=2,node=1" and fields["JobName"] == "ftl-my run"
