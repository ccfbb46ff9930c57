"""Rank 0's view of training: `metrics.jsonl` in the run dir (one JSON object per logged step) and a
rich progress bar with loss, tokens/s and ETA. On a non-terminal (CI, Slurm logs) each logged step is
one plain line instead. With `tensorboard` installed (the `tensorboard` extra), every numeric metric is
also a TensorBoard scalar under RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    import torch


class MetricsLog:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()
        if not enabled:
            return
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.scalars = tensorboard_writer(run_dir / "tensorboard")
        # log_path=False: rich's `console.log` would end every line with a link to this file (metrics.py:63).
        self.console = Console(soft_wrap=True, log_path=False)
        self.progress: Progress | None = None
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, loss="-", tps="-")
            self.progress.start()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "elapsed_s": round(self.elapsed_s(), 3)}
        self.file.write(json.dumps(record) + "\n")
        if self.scalars is not None and "step" in record and "event" not in record:
            for key, value in record.items():
                if key not in ("step", "elapsed_s") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.scalars.add_scalar(key, value, record["step"])
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in record.items())
        if self.progress is not None:
            fields = {}
            if "loss" in record:
                fields = {"loss": f"{record['loss']:.4f}", "tps": f"{record.get('tokens_per_s', 0):,.0f}"}
            self.progress.update(self.task, completed=record.get("step", 0), **fields)
            self.progress.console.log(text)
        else:
            self.console.print(text, highlight=False)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.progress.console if self.progress else self.console).print(text, highlight=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        if self.scalars is not None:
            self.scalars.close()
        self.file.close()


def tensorboard_writer(folder: Path):
    """A TensorBoard SummaryWriter when the optional `tensorboard` package is installed, else None."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:  # torch's writer needs it; without it, metrics.jsonl only
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def memory_record(strategy, device: torch.device) -> dict[str, int]:
    """This rank's model-state bytes (parameters incl. 4-bit storage, gradients, optimizer states, each
    storage counted once) and its peak memory: RSS on CPU, allocated device memory on CUDA."""
    import resource

    import torch  # here, not at the top: `ftl status` and `ftl logs` read metrics without torch

    seen: set[int] = set()

    def nbytes(tensors) -> int:
        total = 0
        for t in tensors:
            if isinstance(t, torch.Tensor):
                local = t.to_local() if hasattr(t, "to_local") else t
                storage = local.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total

    params = list(strategy.model.parameters())
    record = {
        "param_bytes": nbytes(params),
        "grad_bytes": nbytes(p.grad for p in params),
        "optimizer_bytes": nbytes(v for state in strategy.optimizer.state.values() for v in state.values()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if device.type == "cuda":
        record["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return record


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl` (none if it is missing), skipping a line still being written."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
