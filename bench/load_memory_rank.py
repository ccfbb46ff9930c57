"""One rank of bench/load_memory.py: the train entry's build, exactly (the plan in the run dir, the rank
runtime, `Trainer.build`: model built, sharded and filled), and nothing after it; then this rank's host
memory. Usage: torchrun --nproc-per-node N bench/load_memory_rank.py RUN_DIR OUT_JSON

Resident memory is sampled every 10 ms and split as the kernel splits it: anonymous (what the process
allocated: tensors, buffers) and file-backed (pages of the safetensors files mapped by safetensors, which
are page cache the kernel can drop and reread, shared by every rank reading the same file).
"""

import json
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

from launcher.job import RankJob
from launcher.rank_env import RankEnv
from launcher.runtime import RankRuntime, resolve_device
from launcher.stop import PolledStop
from launcher.trainer import Trainer


def resident() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class PeakSampler(threading.Thread):
    """Peak anonymous and file-backed resident bytes while running (the kernel keeps only the total's peak)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = resident()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            now = resident()
            self.peak = {key: max(self.peak[key], now[key]) for key in now}

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.join()
        return self.peak


def main() -> None:
    run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    job, env = RankJob.read(run_dir), RankEnv.from_env()
    device = resolve_device(job.plan.request.device, env.local_rank, str(run_dir / "plan.json"))
    runtime = RankRuntime.start(env, device, job.plan.request.precision, 600)
    trainer = Trainer(job, job.plan, runtime, PolledStop(lambda: False))
    before = resident()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    trainer.build()
    build_s = time.perf_counter() - start
    peak = sampler.stop()
    mine = {
        "rank": env.rank,
        "anon_before": before["RssAnon"],
        "anon_peak": peak["RssAnon"],
        "anon_after": resident()["RssAnon"],
        "file_peak": peak["RssFile"] - before["RssFile"],
        "build_s": build_s,
        "params_held": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in trainer.model.parameters()),
    }
    every = [None] * env.world_size
    dist.all_gather_object(every, mine, group=runtime.control)
    if env.rank == 0:
        out.write_text(json.dumps(every))
    trainer.close()
    runtime.close()


if __name__ == "__main__":
    main()
