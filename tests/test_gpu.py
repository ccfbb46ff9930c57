"""The CUDA paths (nccl, bf16 mixed precision, FSDP2 on GPU), run only where a GPU exists: the CPU suite
covers everything around them (planning, config rendering, the same loop on gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_ftl


def run_on_cuda(run_dir: Path, config: str, *overrides: str, gpus: int = 2, timeout: float = 600) -> None:
    """`ftl run` of `config` on this machine's GPUs (up to `gpus`), to exit 0."""
    gpus = min(gpus, torch.cuda.device_count())
    result = run_ftl(
        "run", config, "hardware.device=cuda", f"--gpus={gpus}", *overrides, f"output_dir={run_dir}", timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_quickstart_on_cuda_in_bf16(strategy, tmp_path):
    run_on_cuda(tmp_path / "run", "configs/quickstart.yaml", f"strategy={strategy}", "train.max_steps=100")
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["precision"] == "bf16" and plan["device"] == "cuda"
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert losses[-1] < losses[0] - 2.0


@pytest.mark.gpu
def test_offload_checks_pinned_memory_on_cuda():
    """On a GPU host that allows pinned memory the check passes; where the memlock limit forbids it,
    the same call raises an FTLError naming `ulimit -l` instead of a CUDA error mid-setup."""
    from strategies.registry import check_pinned_memory

    check_pinned_memory("fsdp2_offload", "cuda")


@pytest.mark.gpu
def test_qlora_on_cuda_trains(tmp_path):
    run_on_cuda(tmp_path / "run", "configs/quickstart.yaml", "method.name=qlora", "train.max_steps=50", gpus=1)


@pytest.mark.gpu
def test_two_step_job_on_nccl_runs_its_cpu_control_collectives(tmp_path):
    """The default group on CUDA is `cpu:gloo,cuda:nccl`: the stop flag, the first-step gradient check and
    evaluation sums (CPU tensors) run at step 1 and 2 beside nccl's gradient all-reduce."""
    run_on_cuda(
        tmp_path / "run", "configs/quickstart.yaml", "train.max_steps=2", "train.warmup_steps=0", "train.log_every=1",
        "train.eval_every=1",
    )
    outcome = json.loads((tmp_path / "run" / "outcome.json").read_text())
    assert outcome["outcome"] == "done" and outcome["step"] == 2


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fsdp2_offload", "zero3", "zero3_offload"])
def test_sharded_and_offloaded_strategies_train_the_pretrained_minilm_on_cuda(strategy, tmp_path):
    """Read twice, never run here: fsdp2_offload keeps BERT's buffers (position_ids) on the GPU while the
    parameter shards live on the host; ZeRO-3 builds the model partitioned (no whole model on any GPU)."""
    run_on_cuda(tmp_path / "run", "configs/minilm-classify.yaml", f"strategy={strategy}", "train.max_steps=30", timeout=900)
    outcome = json.loads((tmp_path / "run" / "outcome.json").read_text())
    assert outcome["outcome"] == "done" and outcome["step"] == 30
