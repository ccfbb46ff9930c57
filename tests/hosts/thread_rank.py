"""A host like Ray Train's worker, for tests: this process creates the gloo process group itself (as Ray
does), then calls the function entry from a non-main thread with a polled stop flag, and checks that the
group it created is still alive afterwards. Started by torchrun only for its environment (RANK,
MASTER_ADDR, ...). Usage: torchrun ... -m tests.hosts.thread_rank RUN_DIR STOP_AT_STEP OUT_JSON"""

import json
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.entries import run_rank
from launcher.stop import PolledStop

if __name__ == "__main__":
    run_dir, stop_at, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    metrics = run_dir / "metrics.jsonl"

    def reached() -> bool:  # the host's own notion of "stop now": here, the loss logged for step `stop_at`
        return metrics.exists() and f'"step": {stop_at},' in metrics.read_text()

    box: dict = {}

    def worker() -> None:
        try:
            box["result"] = run_rank(run_dir, PolledStop(reached, "host asked to stop")).to_dict()
        except BaseException as exc:  # reported to the test, not lost in the thread
            box["error"] = repr(exc)

    thread = threading.Thread(target=worker, name="ray-like-worker")
    thread.start()
    thread.join()
    alive = dist.is_initialized()
    if alive:
        value = torch.ones(1)
        dist.all_reduce(value)  # the group we created still works after the entry returned
        alive = value.item() == dist.get_world_size()
    box["group_alive"] = alive
    if dist.get_rank() == 0:
        out.write_text(json.dumps(box))
    dist.destroy_process_group()
