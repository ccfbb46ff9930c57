"""HSDP: with 2 "nodes" x 2 ranks, FSDP2 shards within a node and replicates across nodes on a 2-D
DeviceMesh. Four real ranks on this machine (torchrun, gloo): losses equal DDP's on the same four."""

from __future__ import annotations

import json
import subprocess
import sys

from launcher.job import prepare_run_dir
from launcher.model_info import model_shape
from launcher.planner import plan, request_from_spec
from launcher.spec import load_spec
from tests.conftest import REPO, tiny_spec, write_spec


def run_four_ranks(strategy: str, tiny_model_dir, tmp_path) -> tuple[list[float], dict]:
    spec = tiny_spec(
        tmp_path,
        model={"name_or_path": str(tiny_model_dir)},
        train={"max_steps": 8, "log_every": 1, "lr": 3e-3},
        hardware={"nodes": 2, "gpus_per_node": 2},
        strategy=strategy,
        output_dir=str(tmp_path / strategy),
    )
    del spec["model"]["config"]
    loaded = load_spec(write_spec(tmp_path, spec, f"{strategy}.yaml"))
    job_plan = plan(request_from_spec(loaded, model_shape(loaded.model), "cpu"))
    prepare_run_dir(loaded, job_plan, fresh=True)  # the plan for 2 nodes x 2 ranks, as a cluster host writes it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone",
           "-m", "launcher.train", "--run-dir", str(loaded.output_dir)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(l) for l in (loaded.output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], job_plan.to_dict()


def test_hsdp_matches_ddp_on_a_2x2_mesh(tiny_model_dir, tmp_path):
    hsdp, hsdp_plan = run_four_ranks("fsdp2", tiny_model_dir, tmp_path)
    assert hsdp_plan["shard_group"] == 2 and hsdp_plan["world_size"] == 4  # 2 replicas x 2 shards
    ddp, _ = run_four_ranks("ddp", tiny_model_dir, tmp_path)
    assert max(abs(a / b - 1) for a, b in zip(hsdp, ddp)) < 1e-4
