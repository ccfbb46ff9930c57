"""Shared test helpers: the repo root, the `ftl` console script of this venv, small spec builders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FTL = str(Path(sys.executable).parent / "ftl")
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 384,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Example configs use repo-relative paths, as a user running from the checkout would."""
    monkeypatch.chdir(REPO)


def tiny_spec(tmp_path: Path, **sections: dict) -> dict:
    spec = {
        "model": {"config": dict(TINY_LLAMA)},
        "data": {"train": str(REPO / "configs/data/quickstart.jsonl")},
        "train": {"max_steps": 10, "lr": 1e-3, "seq_len": 64, "micro_batch_size": 2},
        "hardware": {"gpus_per_node": 1, "device": "cpu", "gpu_mem": "4GB"},
        # The final export (~6 s a run) is tested by the quickstart's run; other tests' runs skip it.
        "checkpoint": {"export_final": False},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def write_spec(tmp_path: Path, spec: dict, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def run_ftl(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FTL, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})}
    )


def save_random_model(folder: Path, config: dict) -> Path:
    """A random-init (seed 0) causal LM of `config` saved as a HF folder: a stand-in for a pretrained one."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.model_info import build_config
    from launcher.spec import ModelSpec

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(build_config(ModelSpec(config=config))).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved random-init tiny Llama (seed 0), so every strategy starts from identical weights."""
    return save_random_model(tmp_path_factory.mktemp("tiny-llama"), TINY_LLAMA)


def two_rank_job(tmp_path: Path, name: str, max_steps: int, every: int, collective_timeout_s: float, **train) -> Path:
    """A tiny 2-rank CPU job logging every step, in its own run dir `tmp_path/name`: the shape of every
    real-process checkpoint and stop test."""
    spec = tiny_spec(
        tmp_path,
        train={"max_steps": max_steps, "log_every": 1, "lr": 3e-3, "collective_timeout_s": collective_timeout_s, **train},
        hardware={"gpus_per_node": 2},
        checkpoint={"every": every, "keep": 2},
        output_dir=str(tmp_path / name),
    )
    return write_spec(tmp_path, spec, f"{name}.yaml")


def metric_records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (a line still being written is skipped)."""
    import json

    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.endswith("}")]


def logged_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_records(run_dir) if "loss" in r}


def wait_until(predicate, timeout_s: float, what: str) -> float:
    """Poll every 0.5 s until `predicate()` holds; return the seconds it took."""
    import time

    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.5)
    return time.monotonic() - start


def wait_for(predicate, timeout: float = 120) -> None:
    import time

    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def rank_processes(proc: subprocess.Popen) -> list:
    """The rank processes under `ftl run` (torchrun's workers, not torchrun itself)."""
    import psutil

    cmdlines = [(p, " ".join(p.cmdline())) for p in psutil.Process(proc.pid).children(recursive=True)]
    return [p for p, cmd in cmdlines if "launcher.train" in cmd and "torch.distributed.run" not in cmd and "cluster.torchrun" not in cmd]
