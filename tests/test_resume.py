"""Checkpoints and exact resume, with real 2-process runs: stop anywhere, lose nothing, continue the
same. Losses are compared bitwise: on CPU with fixed seeds every op here is deterministic."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import sys

import psutil
import pytest
import torch

from launcher.job import prepare_run_dir
from launcher.model_info import model_shape
from launcher.planner import plan, request_from_spec
from launcher.spec import load_spec
from tests.conftest import FTL, REPO, rank_processes, run_ftl, two_rank_job, wait_for
from tests.conftest import logged_losses as losses

STEPS = 16


def job(tmp_path: Path, name: str, **train) -> Path:
    return two_rank_job(tmp_path, name, **{"max_steps": STEPS, **train}, every=4, collective_timeout_s=30)


def ftl_ok(*args: str) -> subprocess.CompletedProcess:
    result = run_ftl(*args, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def ddp_straight(tmp_path_factory) -> dict[int, float]:
    """The losses of one uninterrupted ddp run of `job` (paid once: ~15 s of torchrun start-up and model build),
    the reference of every ddp resume below. No strategy is given, as test_async_save_resumes_bitwise's runs
    give none; the plan must have chosen ddp, so it is also the `strategy=ddp` reference."""
    tmp_path = tmp_path_factory.mktemp("ddp-straight")
    ftl_ok("run", str(job(tmp_path, "straight")))
    assert json.loads((tmp_path / "straight" / "plan.json").read_text())["strategy"] == "ddp"
    return losses(tmp_path / "straight")


# `crafted`: after the resume, the file of the finished checkpoint that is read by plain unpickling is
# replaced by a crafted pickle and must be refused (crafted_pickle_is_refused_not_run): DCP's `.metadata`
# (ddp) and DeepSpeed's optimizer states (zero2). Done on this test's run, it needs no run of its own.
@pytest.mark.parametrize(
    "strategy, extra, crafted",
    [
        ("ddp", [], (".metadata", pickle.dumps)),
        ("fsdp2", [], None),
        ("zero2", [], ("deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt", None)),
        ("ddp", ["method.name=lora"], None),
    ],
    ids=["ddp", "fsdp2", "zero2", "lora-ddp"],  # lora: the checkpoint holds the adapters only
)
def test_stop_and_resume_is_bitwise_identical(tmp_path, strategy, extra, crafted, ddp_straight):
    if strategy == "ddp" and not extra:
        reference = ddp_straight  # the same uninterrupted ddp run test_async_save_resumes_bitwise compares with
    else:
        straight = job(tmp_path, "straight")
        ftl_ok("run", str(straight), f"strategy={strategy}", *extra)
        reference = losses(tmp_path / "straight")
    paused = job(tmp_path, "paused")
    ftl_ok("run", str(paused), f"strategy={strategy}", "train.stop_at=6", *extra)  # saves step 6 (not a multiple of 4)
    assert max(losses(tmp_path / "paused")) == 6
    ftl_ok("run", str(paused), f"strategy={strategy}", *extra)
    assert losses(tmp_path / "paused") == reference
    if crafted:
        ckpt = tmp_path / "paused" / "checkpoints" / f"step-{STEPS}"
        crafted_pickle_is_refused_not_run(tmp_path, paused, ckpt, *crafted, f"strategy={strategy}", f"train.max_steps={STEPS + 1}")


def test_changed_model_or_missing_manifest_is_refused_and_checkpoints_hold_no_pickles(tmp_path):
    """Three checks on one run stopped at step 4 (each used to pay its own ~12 s run): FTL's checkpoint files
    are JSON, not pickles; a changed model is refused; a checkpoint without its manifest is a clear error;
    and --no-resume then starts afresh, keeping the earlier run."""
    spec = job(tmp_path, "changed")
    ftl_ok("run", str(spec), "train.stop_at=4")
    _assert_no_pickles(tmp_path / "changed" / "checkpoints" / "step-4")
    result = run_ftl("run", str(spec), "model.config.hidden_size=128")
    assert result.returncode == 2 and "different model" in result.stderr and "--no-resume" in result.stderr
    (tmp_path / "changed" / "checkpoints" / "step-4" / "manifest.json").unlink()
    result = run_ftl("run", str(spec))
    assert result.returncode == 2 and "manifest.json is missing" in result.stderr
    fresh = ftl_ok("run", str(spec), "model.config.hidden_size=128", "--no-resume")
    assert "earlier run moved to" in fresh.stdout
    assert list((tmp_path / "changed").glob("previous-*/checkpoints/step-4"))  # nothing lost


def _start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [FTL, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env={**os.environ, **(env or {})},
    )


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    spec = job(tmp_path, "midsave")
    root = tmp_path / "midsave" / "checkpoints"
    # The production rank with the saves from step 8 on held 20 s inside step-N.tmp/ before the rename (a
    # host-side hook, tests/hosts/slow_publish_rank.py): kill -9 the whole job in that window. Step 4 is
    # published at once (holding it too only made the test wait 20 s more).
    loaded = load_spec(spec, ["checkpoint.every=4"])
    prepare_run_dir(loaded, plan(request_from_spec(loaded, model_shape(loaded.model), "cpu")), fresh=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         "-m", "tests.hosts.slow_publish_rank", str(loaded.output_dir), "20", "8"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    wait_for(lambda: (root / "step-8.tmp" / "trainer_state.rank1.json").exists(), timeout=180)
    for process in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        process.kill()  # the whole tree at once (torchrun's workers have sessions of their own)
    proc.wait(timeout=30)
    assert (root / "latest").read_text().strip() == "step-4"
    assert (root / "step-4" / "manifest.json").is_file() and (root / "step-8.tmp").is_dir()
    (root / "step-0.deleting").mkdir()  # as a job killed while pruning leaves it
    (root / "step-0.deleting" / "__0_0.distcp").write_bytes(b"x" * 100)
    rerun = ftl_ok("run", str(spec), "checkpoint.every=4")
    assert "resumed from" in rerun.stdout and "step-4" in rerun.stdout
    assert not list(root.glob("*.tmp")) and not list(root.glob("*.deleting"))  # both were cleaned up
    assert losses(tmp_path / "midsave")[STEPS] > 0


def test_corrupt_checkpoint_names_the_file_and_can_fall_back_then_resume_on_another_world_size_continues(tmp_path):
    """Two checks on one run (the second used to pay its own 2-rank run first): a truncated shard is named and
    `on_corrupt=previous` falls back to the checkpoint before it; the finished 2-rank run then resumes on
    1 rank (DCP reshards) and continues where it was."""
    spec = job(tmp_path, "corrupt")
    ftl_ok("run", str(spec), "train.stop_at=8")  # saves step-4 and step-8
    root = tmp_path / "corrupt" / "checkpoints"
    shard = sorted((root / "step-8").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:10])  # truncated
    result = run_ftl("run", str(spec))
    assert result.returncode == 2 and shard.name in result.stderr and "truncated" in result.stderr
    assert "checkpoint.on_corrupt=previous" in result.stderr
    rerun = ftl_ok("run", str(spec), "checkpoint.on_corrupt=previous")
    assert "resuming from" in rerun.stdout and "step-4" in rerun.stdout
    (root / "step-8" / "manifest.json").unlink(missing_ok=True)

    before = losses(tmp_path / "corrupt")
    assert max(before) == STEPS
    ftl_ok("run", str(spec), "--gpus", "1", f"train.max_steps={STEPS + 4}")  # 2 ranks saved it, 1 rank resumes
    after = losses(tmp_path / "corrupt")
    assert min(after) == 1 and STEPS + 1 in after and max(after) == STEPS + 4
    assert abs(after[STEPS + 1] - before[STEPS]) < 0.5 * (before[1] - before[STEPS])  # continues, does not restart
    plan = json.loads((tmp_path / "corrupt" / "plan.json").read_text())
    assert plan["world_size"] == 1


def test_sigterm_saves_and_resume_continues(tmp_path):
    spec = job(tmp_path, "preempt", max_steps=4000, log_every=20)
    proc = _start("run", str(spec), "checkpoint.every=0")
    wait_for(lambda: (tmp_path / "preempt" / "metrics.jsonl").exists() and len(losses(tmp_path / "preempt")) >= 2)
    proc.send_signal(signal.SIGTERM)  # to `ftl run`, which forwards it through torchrun to the ranks
    proc.wait(timeout=60)
    records = [json.loads(l) for l in (tmp_path / "preempt" / "metrics.jsonl").read_text().splitlines()]
    event = [r for r in records if r.get("event") == "preempted"]
    assert event, records[-3:]
    step = event[0]["step"]
    assert (tmp_path / "preempt" / "checkpoints" / "latest").read_text().strip() == f"step-{step}"
    rerun = ftl_ok("run", str(spec), "checkpoint.every=0", f"train.max_steps={step + 5}")
    assert f"step {step}" in rerun.stdout


def _assert_no_pickles(checkpoint: Path) -> None:
    """FTL's own files are JSON; DCP's are tensors and `.metadata` (read with an allowlist, tested below)."""
    for file in checkpoint.iterdir():
        if file.suffix == ".json":
            json.loads(file.read_text())
        else:
            assert file.suffix == ".distcp" or file.name == ".metadata", file


def test_async_save_resumes_bitwise(tmp_path, ddp_straight):
    """Background (DCP async) saves: training goes on while they are written; resuming from one is exact."""
    paused = job(tmp_path, "async")
    ftl_ok("run", str(paused), "checkpoint.async_save=true", "train.stop_at=10")
    root = tmp_path / "async" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-10" and (root / "step-8" / "manifest.json").is_file()
    ftl_ok("run", str(paused), "checkpoint.async_save=true")
    assert losses(tmp_path / "async") == ddp_straight


def test_async_save_is_published_while_training_goes_on_and_a_killed_rank_fails_fast(tmp_path):
    """A background save becomes `latest` as soon as it is written, not at the next save: a job killed
    between two saves resumes from the last one. The kill is SIGKILL to one rank, mid-training: the job
    fails fast, not at the collective timeout. (Two tests once, each paying its own run.)"""
    spec = job(tmp_path, "published", max_steps=4000, log_every=10)
    args = ("checkpoint.async_save=true", "checkpoint.every=200")
    proc = _start("run", str(spec), *args)
    root = tmp_path / "published" / "checkpoints"
    wait_for(lambda: (root / "latest").exists())
    metrics = (tmp_path / "published" / "metrics.jsonl").read_text().splitlines(keepends=True)
    logged = max(json.loads(l)["step"] for l in metrics if l.endswith("\n") and '"loss"' in l)
    rank_processes(proc)[-1].kill()  # SIGKILL one rank, mid-training
    start = time.monotonic()
    code = proc.wait(timeout=60)
    assert code != 0 and time.monotonic() - start < 60
    assert (root / "latest").read_text().strip() == "step-200" and logged < 400
    rerun = ftl_ok("run", str(spec), *args, "train.max_steps=210")
    assert f"resumed from {root / 'step-200'}" in rerun.stdout


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_pickle_is_refused_not_run(tmp_path: Path, spec: Path, ckpt: Path, name: str, dump, *args: str) -> None:
    """DCP reads `.metadata`, and DeepSpeed its .pt files, with plain unpickling; FTL reads both allowing
    only their own classes, so a crafted checkpoint cannot run code on resume. `ckpt`: the checkpoint the
    run of `spec` with `args` resumes from (test_stop_and_resume_is_bitwise_identical's, for ddp and zero2)."""
    marker = tmp_path / "pwned"
    if dump is None:
        torch.save({"optimizer_state_dict": _Payload(marker)}, ckpt / name)
    else:
        (ckpt / name).write_bytes(dump(_Payload(marker)))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = (ckpt / name).stat().st_size  # as a careful attacker would
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    result = run_ftl("run", str(spec), *args, timeout=300)
    assert result.returncode != 0 and not marker.exists()
    output = result.stdout + result.stderr
    assert "refuses to unpickle" in output and "posix.system" in output and str(ckpt) in output
