"""Checkpoint directories: written as `step-N.tmp/`, renamed to `step-N/` once every rank has finished
and the manifest is written, then the `latest` pointer is replaced atomically; the last K are kept.

The strategy writes the tensors (DCP for DDP/FSDP2, DeepSpeed's own for ZeRO); this module owns the
directory protocol and the JSON beside it. Nothing here unpickles: metadata is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from launcher.errors import FTLError
from launcher.rank_env import RankEnv
from strategies.base import Strategy

LATEST = "latest"
MANIFEST = "manifest.json"
DELETING = ".deleting"


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
    With `background`, the tensors are written by DCP's async writer while training goes on; `poll()`,
    called every step, publishes the checkpoint (manifest, rename, `latest`) as soon as every rank's
    writes are done, and a new save first completes the one in flight: at most one is in flight."""

    def __init__(
        self,
        run_dir: Path,
        strategy: Strategy,
        env: RankEnv,
        keep: int,
        spec_hash: str,
        background: bool,
        control: dist.ProcessGroup | None = None,
        every: int = 0,
        before_publish: Callable[[Path], None] | None = None,
        after_publish: Callable[[Path, int], None] | None = None,
    ) -> None:
        """`control`: a CPU (gloo) group on which ranks agree that their background writes are done (no
        device sync); the default group if None. `every`: the save cadence in steps (0: only at the end).
        `before_publish`: called with the `.tmp` dir before it is renamed (a host may time or delay it).
        `after_publish`: called on every rank, at the same point, with the finished dir and its step once
        it is complete and `latest` names it (Ray registers it with `ray.train.report` there)."""
        self.root = checkpoint_root(run_dir)
        self.strategy, self.env, self.keep, self.spec_hash, self.background = strategy, env, keep, spec_hash, background
        self.every = every
        self._pending: tuple[int, Path, Future | None] | None = None
        self._control = control
        self._before_publish = before_publish
        self._after_publish = after_publish

    def should_save(self, step: int, last_step: int) -> bool:
        """A periodic save; the last step's save is the loop's own (it decides how the run ends)."""
        return bool(self.every) and step % self.every == 0 and step != last_step

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def poll(self) -> None:
        """Publish the background save in flight once every rank has written its part (collective;
        a tiny all-reduce per step while a save is in flight, nothing otherwise)."""
        if self._pending is None or self._pending[2] is None:
            return
        done = torch.tensor([int(self._pending[2].done())])
        dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._control)
        if done.item():
            self.finish()

    def save(self, step: int, trainer_state: dict, wait: bool = False) -> Path:
        self.finish()
        tmp = self.root / f"step-{step}.tmp"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier(group=self._control)
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
        if self._before_publish is not None:
            self._before_publish(tmp)
        dist.barrier(group=self._control)
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
        dist.barrier(group=self._control)
        if self._after_publish is not None:
            self._after_publish(final, step)
        return final


def clean_stale_tmp(run_dir: Path) -> list[Path]:
    """Remove half-written `step-N.tmp/` dirs left by a job killed during a save, and half-deleted
    `step-N.deleting/` ones left by a job killed while pruning (rank 0, before training)."""
    root = checkpoint_root(run_dir)
    stale = sorted([*root.glob("step-*.tmp"), *root.glob(f"step-*{DELETING}")])
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
        candidates += reversed(_complete(root))
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
    """Drop all but the last `keep` checkpoints, never the one `latest` names. Each is renamed out of
    the way (atomic, instant), then deleted by a thread: removing a multi-GB checkpoint took 0.7 s
    (bench/checkpoint.py) that the training loop would otherwise wait for. A job killed meanwhile leaves
    `step-N.deleting/`, removed at the next start."""
    latest = (root / LATEST).read_text().strip()
    for old in _complete(root)[:-keep]:
        if old.name != latest:
            doomed = old.with_name(old.name + DELETING)
            os.rename(old, doomed)
            threading.Thread(target=shutil.rmtree, args=(doomed,), kwargs={"ignore_errors": True}, name="ftl-prune").start()


def _complete(root: Path) -> list[Path]:
    """The finished checkpoints under `root`, oldest first."""
    return sorted((p for p in root.glob("step-*") if p.is_dir() and p.name.removeprefix("step-").isdigit()), key=_step_of)


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
