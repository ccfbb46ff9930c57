"""The rank runtime's process groups, in this process (world size 1): the default group's backends per
device, adopting a group the host created without destroying it, and control collectives on CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from launcher.errors import FTLError
from launcher.rank_env import RankEnv
from launcher.runtime import RankRuntime, default_group_backend
from launcher.stop import PolledStop, SignalStop

ONE = RankEnv(rank=0, local_rank=0, world_size=1, local_world_size=1)


def test_cuda_jobs_get_a_cpu_backend_beside_nccl():
    assert default_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert default_group_backend("cpu") == "gloo"


def test_a_group_without_a_cpu_backend_refuses_cpu_tensors_the_control_group_does_not():
    """The failure `"nccl"` alone caused, reproduced on CPU with a group whose only backend is for CUDA
    tensors; the runtime's control group takes the same CPU tensor."""
    dist.init_process_group("cuda:gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="device type cpu"):
            dist.all_reduce(torch.ones(1))
        runtime = RankRuntime.start(ONE, torch.device("cpu"), "fp32", timeout_s=30)
        assert runtime.control._get_backend(torch.device("cpu")) is not None  # the group object has a CPU backend
        assert runtime.any_true(True) and not runtime.any_true(False)
        assert runtime.sum(torch.tensor([2.0])).item() == 2.0
        assert runtime.first_text("ftl cancel ✓") == "ftl cancel ✓" and runtime.first_text(None) is None
        runtime.close()
        assert dist.is_initialized()  # adopted: the host's group is left alone
    finally:
        dist.destroy_process_group()


def test_runtime_creates_and_destroys_its_own_group(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29731")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    runtime = RankRuntime.start(ONE, torch.device("cpu"), "bf16", timeout_s=30)
    assert runtime.owns_default_group and runtime.compute_dtype == torch.bfloat16
    runtime.close()
    assert not dist.is_initialized()


def test_signal_stop_records_the_signal_and_restores_handlers():
    import os
    import signal

    before = signal.getsignal(signal.SIGUSR2)
    stop = SignalStop()
    assert stop.requested() is None
    os.kill(os.getpid(), signal.SIGUSR2)
    assert stop.requested() == "SIGUSR2"  # the process was not killed: the handler only set a flag
    stop.close()
    assert signal.getsignal(signal.SIGUSR2) == before


def test_signal_stop_refuses_a_non_main_thread_and_polled_stop_works_there():
    import threading

    seen = {}

    def body():
        try:
            SignalStop()
        except RuntimeError as exc:
            seen["error"] = str(exc)
        flag = threading.Event()
        stop = PolledStop(flag.is_set)
        seen["before"] = stop.requested()
        flag.set()
        seen["after"] = stop.requested()

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert "PolledStop" in seen["error"] and seen["before"] is None and seen["after"]


def test_bf16_on_a_gpu_without_bf16_arithmetic_is_refused_before_anything_runs(monkeypatch):
    """A V100 or T4 would emulate bf16 (the plan's default on CUDA), many times slower, without an error. The
    GPU's answers are stood in for (no GPU here); the decision made on them is the code under test."""
    from launcher.runtime import check_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(FTLError, match=r"V100.*capability 7\.0.*`train\.precision: fp32`"):
        check_precision(torch.device("cuda", 0), "bf16", "run/plan.json")
    check_precision(torch.device("cuda", 0), "fp32", "run/plan.json")  # fp32 runs there
    check_precision(torch.device("cpu"), "bf16", "run/plan.json")  # the CPU is not asked


def test_a_device_the_host_chose_wins_over_the_local_rank():
    env = RankEnv.from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert env.cuda_index == 1
    assert dataclasses.replace(env, device_index=2).cuda_index == 2  # Ray's get_device() for this worker
