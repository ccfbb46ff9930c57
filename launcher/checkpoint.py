"""Checkpoint directories: written as `step-N.tmp/`, renamed to `step-N/` once every rank has finished
and the manifest is written, then the `latest` pointer is replaced atomically; the last K are kept.

The strategy writes the tensors (DCP for DDP/FSDP); this module owns the directory protocol and the
JSON beside it. Nothing here unpickles: metadata is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from launcher.rank_env import RankEnv
from strategies.base import Strategy

LATEST = "latest"
MANIFEST = "manifest.json"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, strategy: Strategy, env: RankEnv, trainer_state: dict, keep: int) -> Path:
    root = checkpoint_root(run_dir)
    tmp, final = root / f"step-{step}.tmp", root / f"step-{step}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    strategy.save(tmp)
    _write_json(tmp / f"trainer_state.rank{env.rank}.json", trainer_state)
    dist.barrier()
    if env.is_main:
        manifest = {
            "step": step,
            "world_size": env.world_size,
            "strategy": strategy.name,
            "files": {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        _write_json(tmp / MANIFEST, manifest)
        if final.exists():  # a finished checkpoint of the same step (e.g. a rerun): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, final.name)
        _prune(root, keep)
    dist.barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if (path / MANIFEST).is_file() else None


def _prune(root: Path, keep: int) -> None:
    latest = (root / LATEST).read_text().strip()
    done = sorted((p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")), key=_step_of)
    for old in done[:-keep]:
        if old.name != latest:
            shutil.rmtree(old)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
