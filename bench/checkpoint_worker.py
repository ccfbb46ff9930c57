"""Per-rank part of bench/checkpoint.py (started by torchrun): times FTL's checkpoint saves and loads
on a ~300M-parameter model. Usage: torchrun ... bench/checkpoint_worker.py SPEC.yaml MODE OUT.json
MODE: save (sync save, then an async save whose blocking time is measured) | load (resume-with-reshard)."""

import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.checkpoint import Checkpointer, find_resume_checkpoint
from launcher.job import strategy_config
from launcher.model_info import model_shape, transformer_blocks
from launcher.modeling import build_model, build_optimizer
from launcher.planner import plan, request_from_spec
from launcher.rank_env import RankEnv
from launcher.runtime import RankRuntime
from launcher.spec import load_spec
from launcher.train_state import spec_fingerprint
from strategies.registry import get_strategy


def main() -> None:
    spec_path, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    spec = load_spec(spec_path)
    env = RankEnv.from_env()
    runtime = RankRuntime.start(env, torch.device("cpu"), "fp32", timeout_s=600)
    job_plan = plan(request_from_spec(spec, model_shape(spec.model), "cpu"))
    strategy = get_strategy(job_plan.strategy)(strategy_config(spec, job_plan), runtime.ctx)
    torch.manual_seed(0)
    model = build_model(spec)
    strategy.setup(model, transformer_blocks(model), lambda m: build_optimizer(m, spec.train, "cpu"), None)
    batch = torch.randint(0, 384, (1, 32))
    strategy.model(input_ids=batch, labels=batch).loss.backward()
    strategy.step(1.0)  # optimizer states exist from here on
    result = {}
    if mode == "save":
        sync = Checkpointer(spec.output_dir, strategy, env, keep=3, spec_hash=spec_fingerprint(spec), background=False)
        for step in (0, 1):  # the first save also pays one-time costs (DCP planning caches, new files); report the second
            dist.barrier()
            start = time.perf_counter()
            path = sync.save(step, {"step": step})
            result[f"sync_save_s_{step}"] = time.perf_counter() - start
        result["sync_save_s"] = result["sync_save_s_1"]
        result["bytes"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        background = Checkpointer(
            spec.output_dir, strategy, env, keep=3, spec_hash=spec_fingerprint(spec), background=True, control=runtime.control
        )
        for step in (2, 3):  # the first background save allocates the staging buffers; later ones reuse them
            dist.barrier()
            start = time.perf_counter()
            background.save(step, {"step": step})
            result[f"async_block_s_{step}"] = time.perf_counter() - start  # what the training loop waits for
            while background.in_flight:  # as the training loop does, once per step
                time.sleep(0.1)
                poll_start = time.perf_counter()
                background.poll()
                # the poll that publishes it (manifest, rename, `latest`, pruning) blocks training too
                result[f"async_publish_s_{step}"] = time.perf_counter() - poll_start
            result[f"async_total_s_{step}"] = time.perf_counter() - start
        del sync, background  # they hold the strategy (see the end of main)
    else:
        ckpt = find_resume_checkpoint(spec.output_dir, spec_fingerprint(spec), fallback=False)
        dist.barrier()
        start = time.perf_counter()
        strategy.load(ckpt.path)
        result["load_s"] = time.perf_counter() - start
        result["saved_world"] = ckpt.manifest["world_size"]
    if env.is_main:
        Path(out).write_text(json.dumps(result))
    # Every object holding the DDP wrapper goes before the process group does (its reducer's destructor
    # joins the group's threads).
    del strategy, model
    gc.collect()
    runtime.close()


if __name__ == "__main__":
    main()
