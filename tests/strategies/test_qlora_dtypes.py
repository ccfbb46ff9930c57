"""QLoRA under FSDP2 when the 4-bit compute dtype differs from the job's precision (bf16 training with
`method.qlora.compute_dtype: fp32`, the combination a user picks for stabler adapters): FSDP2's
mixed-precision cast covers frozen parameters too, so the packed 4-bit words must be stored in its param
dtype or they are converted numerically (the run crashed here before). Real 2-rank runs on CPU in bf16:
the first steps' losses match DDP's, whose 4-bit weights FSDP2 never touches."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_ftl, tiny_spec, write_spec


def losses(tmp_path: Path, tiny_model_dir: Path, strategy: str) -> list[float]:
    spec = tiny_spec(
        tmp_path, model={"name_or_path": str(tiny_model_dir), "init": "pretrained"}, hardware={"gpus_per_node": 2},
        strategy=strategy, output_dir=str(tmp_path / strategy), train={"max_steps": 4, "log_every": 1, "lr": 3e-3, "precision": "bf16"},
        method={"name": "qlora", "lora": {"r": 4}, "qlora": {"compute_dtype": "fp32"}},
    )
    spec["model"].pop("config")
    result = run_ftl("run", str(write_spec(tmp_path, spec, f"{strategy}.yaml")))
    assert result.returncode == 0, result.stderr[-3000:]
    records = (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in records if '"loss"' in line]


def test_qlora_fsdp2_in_bf16_with_fp32_compute_matches_ddp(tmp_path: Path, tiny_model_dir: Path) -> None:
    ddp, fsdp2 = losses(tmp_path, tiny_model_dir, "ddp"), losses(tmp_path, tiny_model_dir, "fsdp2")
    assert len(ddp) == len(fsdp2) == 4
    assert fsdp2[0] == ddp[0]  # step 1 sees the base weights only: the same 4-bit values
    assert max(abs(a / b - 1) for a, b in zip(fsdp2, ddp)) < 0.01  # bf16 reductions in another order after that
