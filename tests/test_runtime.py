"""The rank runtime with real processes: stop signals reach every rank and end in a checkpoint and the
pre-emption exit code with nothing left running; the function entry runs in a non-main thread on a
group its host created; ranks run the plan they are given and refuse hardware it was not made for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from launcher.job import prepare_run_dir
from launcher.model_info import model_shape
from launcher.outcome import EXIT_PREEMPTED
from launcher.planner import plan, request_from_spec
from launcher.spec import load_spec
from tests.conftest import FTL, REPO, rank_processes, run_ftl, two_rank_job, wait_for
from tests.conftest import logged_losses as losses
from tests.conftest import metric_records as records

STEPS = 300


def job(tmp_path: Path, name: str, **train) -> Path:
    return two_rank_job(tmp_path, name, **{"max_steps": STEPS, **train}, every=0, collective_timeout_s=60)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([FTL, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, float]:
    """The reference: the same job run start to end without interruption."""
    tmp = tmp_path_factory.mktemp("straight")
    result = run_ftl("run", str(job(tmp, "straight")))
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(tmp / "straight")


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM], ids=["SIGUSR2", "SIGTERM"])
def test_stop_signal_to_ftl_run_checkpoints_exits_75_leaves_nothing_and_resumes_bitwise(tmp_path, sig, straight):
    spec = job(tmp_path, "stopped")
    run_dir = tmp_path / "stopped"
    proc = start("run", str(spec))
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 3)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(rank_processes(proc)) == 2
    os.kill(proc.pid, sig)  # to `ftl run` only, as Slurm's --signal=USR2 or `kill` would
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    assert not still_running(tree), still_running(tree)  # no orphaned rank, no torchrun left behind
    event = [r for r in records(run_dir) if r.get("event") == "preempted"]
    assert len(event) == 1 and sig.name in event[0]["detail"]
    step = event[0]["step"]
    assert step < STEPS and (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{step}"
    outcome = json.loads((run_dir / "outcome.json").read_text())
    assert outcome["outcome"] == "preempted" and outcome["exit_code"] == EXIT_PREEMPTED

    rerun = run_ftl("run", str(spec))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{step}'}" in rerun.stdout
    assert losses(run_dir) == straight  # bitwise: every step's loss equals the uninterrupted run's


def test_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    spec = job(tmp_path, "onerank", max_steps=3000)
    run_dir = tmp_path / "onerank"
    proc = start("run", str(spec))
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 3)
    ranks = sorted(rank_processes(proc), key=lambda p: p.pid)
    ranks[-1].send_signal(signal.SIGUSR2)  # only one rank hears it
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    saved = {json.loads(f.read_text())["step"] for f in ckpt.glob("trainer_state.rank*.json")}
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert len(list(ckpt.glob("trainer_state.rank*.json"))) == 2 and saved == {manifest["step"]}
    detail = [r["detail"] for r in records(run_dir) if r.get("event") == "preempted"][0]
    assert detail.startswith("SIGUSR2")  # rank 0 reports the signal the other rank heard


def prepared(tmp_path: Path, name: str, device: str = "cpu", **train) -> Path:
    spec = load_spec(job(tmp_path, name, **train), [f"hardware.device={device}"])
    prepare_run_dir(spec, plan(request_from_spec(spec, model_shape(spec.model), device)), fresh=True)
    return spec.output_dir


def test_function_entry_in_a_thread_on_the_hosts_group(tmp_path):
    """As Ray Train hosts it: the host creates the process group, calls the entry from a non-main thread
    (no signal handlers possible), stops it through a polled flag; the group survives the entry."""
    run_dir = prepared(tmp_path, "threaded", max_steps=3000)
    out = tmp_path / "thread.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "tests.hosts.thread_rank", str(run_dir), "20", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    box = json.loads(out.read_text())
    assert "error" not in box, box
    assert box["result"]["outcome"] == "preempted" and box["result"]["exit_code"] == EXIT_PREEMPTED
    step = box["result"]["step"]
    assert 20 <= step < 3000 and box["group_alive"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{step}"
    assert losses(run_dir)[step] < losses(run_dir)[1]  # it trained


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cuda_plan_on_a_cpu_machine_is_one_paragraph_and_writes_nothing(tmp_path):
    # Through `ftl run`: refused before the run dir is touched.
    spec = job(tmp_path, "cudarun")
    result = run_ftl("run", str(spec), "hardware.device=cuda")
    assert result.returncode == 2 and "no CUDA device" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "cudarun").exists()
    # A run dir whose plan was made for CUDA elsewhere (a login node, a batch script), started here.
    run_dir = prepared(tmp_path, "cudaplan", device="cuda")
    assert json.loads((run_dir / "plan.json").read_text())["device"] == "cuda"
    before = snapshot(run_dir)
    cmd = [sys.executable, "-m", "cluster.torchrun", "--nproc-per-node", "2", "--standalone",
           "-m", "launcher.train", "--run-dir", str(run_dir)]
    ranks = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ranks.returncode == 1  # torchrun's code for a failed worker
    errors = [l for l in ranks.stderr.splitlines() if l.startswith("error (rank")]
    assert len(errors) == 1 and all("was made for CUDA GPUs" in e and "hardware.device=cpu" in e for e in errors), ranks.stderr[-2000:]  # once per node
    # Each rank exited 2 (a user mistake, not a crash): torchrun's traceback and failure table are left out.
    assert "torchrun: the ranks stopped: a user error" in ranks.stderr and "Traceback" not in ranks.stderr and "Root Cause" not in ranks.stderr, ranks.stderr[-3000:]
    after = snapshot(run_dir)
    outcome = json.loads(after.pop("outcome.json"))  # only what the launcher reads its exit code from
    for rank in (0, 1):  # and what each rank printed: the terminal shows rank 0's paragraph, each log its own
        assert b"was made for CUDA GPUs" in after.pop(f"logs/rank-{rank}.log")
    assert after == before and outcome["outcome"] == "error" and "was made for CUDA GPUs" in outcome["detail"]


def test_ranks_run_the_plan_they_are_given(tmp_path):
    """The plan in the run dir, not one the ranks make: a plan forcing fsdp2 for a job whose spec says
    auto (which would pick ddp) runs fsdp2."""
    spec = load_spec(job(tmp_path, "contract", max_steps=4), ["hardware.device=cpu"])
    forced = load_spec(job(tmp_path, "contract", max_steps=4), ["hardware.device=cpu", "strategy=fsdp2"])
    prepare_run_dir(spec, plan(request_from_spec(forced, model_shape(forced.model), "cpu")), fresh=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "launcher.train", "--run-dir", str(spec.output_dir)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((spec.output_dir / "checkpoints" / "step-4" / "manifest.json").read_text())
    assert manifest["strategy"] == "fsdp2" and "FTL: fsdp2 on 2 x cpu" in result.stdout


def test_other_world_size_replans_on_resume_and_is_refused_otherwise(tmp_path):
    run_dir = prepared(tmp_path, "world", max_steps=12, stop_at=6)  # planned for 2 ranks
    one_rank = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone",
                "-m", "launcher.train", "--run-dir", str(run_dir)]
    refused = subprocess.run(one_rank, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "was made for 2 ranks" in refused.stderr and "but 1 ranks started" in refused.stderr
    assert not (run_dir / "metrics.jsonl").exists()
    two = subprocess.run([*one_rank[:4], "2", *one_rank[5:]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    # The host writes the job again without the pause, still planned for 2 ranks; 1 rank resumes it.
    spec = load_spec(job(tmp_path, "world", max_steps=12), ["hardware.device=cpu"])
    prepare_run_dir(spec, plan(request_from_spec(spec, model_shape(spec.model), "cpu")), fresh=False)
    resumed = subprocess.run(one_rank, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    replanned = [r for r in records(run_dir) if r.get("event") == "replanned"]
    assert len(replanned) == 1 and replanned[0]["world_size"] == 1 and "re-planned for 1 x 1 ranks" in replanned[0]["detail"]
    assert "resumed from" in resumed.stdout and min(losses(run_dir)) == 1 and max(losses(run_dir)) == 12


def test_a_mistake_the_ranks_find_is_exit_2_with_its_paragraph(tmp_path):
    """A data file that breaks after `ftl run` checked it (the pre-flight reads every file first): torchrun
    reports its ranks' exits as 1, `ftl run` says 2 and prints the ranks' one paragraph (read from
    outcome.json), without torchrun's traceback."""
    data = tmp_path / "data.jsonl"
    data.write_text((REPO / "configs/data/quickstart.jsonl").read_text())
    proc = start("run", str(job(tmp_path, "baddata", max_steps=4)), f"data.train={data}")
    wait_for(lambda: (tmp_path / "baddata" / "plan.json").exists())  # written after the pre-flight, before torchrun starts
    data.write_text('{"text": "fine"}\n{"text": "broken\n')  # the ranks are still importing torch
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2, output[-3000:]
    assert f"Cannot read data file {data}: line 2" in output.splitlines()[-1] and "Traceback" not in output, output[-3000:]
    assert json.loads((tmp_path / "baddata" / "outcome.json").read_text())["outcome"] == "error"
