"""Checkpoint directories: written as `step-N.tmp/`, renamed to `step-N/` once every rank has finished
and the manifest is written, then the `latest` pointer is replaced atomically; the last K are kept.

The strategy writes the tensors (DCP for DDP/FSDP2, DeepSpeed's own for ZeRO); this module owns the
directory protocol and the JSON beside it. Nothing here unpickles: metadata is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from launcher.errors import FTLError
from launcher.rank_env import RankEnv
from strategies.base import Strategy

LATEST = "latest"
MANIFEST = "manifest.json"
DCP_STRATEGIES = ("ddp", "fsdp2", "fsdp2_offload")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    manifest: dict

    @property
    def step(self) -> int:
        return self.manifest["step"]

    def trainer_state(self, rank: int) -> dict:
        """This rank's state; on another world size, rank 0's (data position and RNG are re-derived)."""
        own = self.path / f"trainer_state.rank{rank}.json"
        return json.loads((own if own.is_file() else self.path / "trainer_state.rank0.json").read_text())


class Checkpointer:
    """Saves this run's checkpoints. Every rank writes into `step-N.tmp/`; once all are done, rank 0
    writes the manifest, renames the dir to `step-N/`, replaces `latest` and prunes to the last K.
    With `background`, the tensors are written by DCP's async writer while training goes on, and the
    rename happens at the next save or at `finish()`: at most one save is in flight."""

    def __init__(self, run_dir: Path, strategy: Strategy, env: RankEnv, keep: int, spec_hash: str, background: bool) -> None:
        self.root = checkpoint_root(run_dir)
        self.strategy, self.env, self.keep, self.spec_hash, self.background = strategy, env, keep, spec_hash, background
        self._pending: tuple[int, Path, Future | None] | None = None

    def save(self, step: int, trainer_state: dict, wait: bool = False) -> Path:
        self.finish()
        tmp = self.root / f"step-{step}.tmp"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        future = self.strategy.save(tmp, background=self.background and not wait)
        _write_json(tmp / f"trainer_state.rank{self.env.rank}.json", trainer_state)
        self._pending = (step, tmp, future)
        if future is None:
            return self.finish()
        return self.root / f"step-{step}"

    def finish(self) -> Path | None:
        """Complete the save in flight, if any (collective)."""
        if self._pending is None:
            return None
        step, tmp, future = self._pending
        self._pending = None
        if future is not None:
            future.result()
        _test_hook_slow_save()
        dist.barrier()
        final = self.root / f"step-{step}"
        if self.env.is_main:
            manifest = {
                "step": step,
                "world_size": self.env.world_size,
                "strategy": self.strategy.name,
                "spec_hash": self.spec_hash,
                "files": {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()},
            }
            _write_json(tmp / MANIFEST, manifest)
            _fsync_tree(tmp)
            if final.exists():  # a finished checkpoint of the same step (e.g. a rerun): replace it whole
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            _write_text_atomic(self.root / LATEST, final.name)
            _prune(self.root, self.keep)
        dist.barrier()
        return final


def clean_stale_tmp(run_dir: Path) -> list[Path]:
    """Remove half-written `step-N.tmp/` dirs left by a job killed during a save (rank 0, before training)."""
    stale = sorted(checkpoint_root(run_dir).glob("step-*.tmp"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def find_resume_checkpoint(run_dir: Path, spec_hash: str, fallback: bool) -> Checkpoint | None:
    """The checkpoint `latest` points to, verified against its manifest; with `fallback`, the newest
    complete one when `latest` is damaged. None when the run dir has no checkpoint."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    candidates = [root / pointer.read_text().strip()]
    if fallback:
        candidates += sorted((p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")), key=_step_of, reverse=True)
    problems = []
    for path in dict.fromkeys(candidates):
        problem = verify(path)
        if problem:
            problems.append(problem)
            continue
        ckpt = Checkpoint(path, json.loads((path / MANIFEST).read_text()))
        if ckpt.manifest.get("spec_hash") != spec_hash:
            raise FTLError(
                f"The checkpoint {path} was written for a different model, method, task, tokenizer or seq_len than "
                "this spec. Resume with the spec it was written with, or start over with `--no-resume` (the old run "
                "moves to previous-<time>/) or another `output_dir`."
            )
        return ckpt
    hint = "" if fallback else " Pass `checkpoint.on_corrupt=previous` to resume from the newest complete checkpoint instead,"
    raise FTLError(f"Cannot resume: {problems[0]}.{hint} or `--no-resume` to start over.")


def verify(path: Path) -> str:
    """'' if the checkpoint at `path` is complete (every file of its manifest, at its size), else why not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (the checkpoint is incomplete)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return f"{manifest} is not a valid FTL manifest"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, the manifest says {size} (truncated or damaged)"
    return ""


def _prune(root: Path, keep: int) -> None:
    latest = (root / LATEST).read_text().strip()
    done = sorted((p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")), key=_step_of)
    for old in done[:-keep]:
        if old.name != latest:
            shutil.rmtree(old)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _test_hook_slow_save() -> None:
    """Tests kill a job mid-save; this widens the window (FTL_TEST_SLOW_SAVE_S seconds before the rename)."""
    delay = float(os.environ.get("FTL_TEST_SLOW_SAVE_S", "0"))
    if delay:
        time.sleep(delay)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
