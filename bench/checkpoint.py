"""Checkpoint throughput, side by side in one run on the same disk: FTL's sync save of a ~300M-param
model (2 ranks, DDP, weights + AdamW states through DCP) vs `dd` writing the same byte count with
fdatasync; the time an async save blocks training vs a sync save; load time and resume-with-reshard
time (saved on 2 ranks, loaded on 1).

Usage: python bench/checkpoint.py [WORK_DIR]
Last line: RESULT save_mb_s=.. dd_mb_s=.. save_ratio=.. async_block_ratio=.. async_block_ratio_libc_default=.. load_s=.. reshard_load_s=..
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from cluster.local import job_env

REPO = Path(__file__).resolve().parents[1]
MODEL = {  # Llama-architecture, ~300M parameters
    "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
}


def torchrun(nproc: int, *args: str, libc_default: bool = False) -> None:
    """The worker on `nproc` ranks, in the environment `ftl run` gives CPU ranks (or without FTL's
    glibc copy tunable, to show what it changes)."""
    env = job_env("cpu", dict(os.environ))
    if libc_default:
        env.pop("GLIBC_TUNABLES")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", "bench/checkpoint_worker.py", *args]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=env)


def dd_mb_s(path: Path, nbytes: int) -> float:
    block = 16 * 2**20
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={max(1, nbytes // block)}", "conv=fdatasync"],
                   check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    path.unlink()
    return nbytes / elapsed / 1e6


def blocked(save: dict) -> float:
    """Steady-state time a background save holds the training loop: staging + publishing."""
    return save["async_block_s_3"] + save["async_publish_s_3"]


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="ftl-bench-ckpt-"))
    run_dir = work / "run"
    spec = {
        "model": {"config": MODEL},
        "data": {"train": str(REPO / "configs/data/quickstart.jsonl")},
        "train": {"max_steps": 10, "lr": 1e-4, "seq_len": 32},
        "hardware": {"gpus_per_node": 2, "device": "cpu", "gpu_mem": "20GB"},
        "strategy": "ddp",
        "output_dir": str(run_dir),
    }
    spec_path, libc_spec_path = work / "job.yaml", work / "job_libc.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    libc_spec_path.write_text(yaml.safe_dump({**spec, "output_dir": str(work / "run_libc")}))
    try:
        # Each save run starts from an empty run dir (replacing an old checkpoint would be timed too).
        torchrun(2, str(libc_spec_path), "save", str(work / "save_libc.json"), libc_default=True)
        save_libc = json.loads((work / "save_libc.json").read_text())
        shutil.rmtree(work / "run_libc")
        torchrun(2, str(spec_path), "save", str(work / "save.json"))
        save = json.loads((work / "save.json").read_text())
        dd = dd_mb_s(work / "dd.bin", save["bytes"])
        torchrun(2, str(spec_path), "load", str(work / "load.json"))
        load = json.loads((work / "load.json").read_text())
        torchrun(1, str(spec_path), "load", str(work / "reshard.json"))
        reshard = json.loads((work / "reshard.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_mb_s = save["bytes"] / save["sync_save_s"] / 1e6
    # Both runs save the same bytes to the same disk, and the disk is the noisy part: the blocking
    # times are compared with the faster of the two sync saves (the stricter ratio).
    sync_s = min(save["sync_save_s"], save_libc["sync_save_s"])
    print(f"checkpoint bytes        {save['bytes'] / 1e9:.2f} GB (weights + AdamW states, fp32)")
    print(f"sync save, first        {save['sync_save_s_0']:.2f} s")
    print(f"sync save, steady       {save['sync_save_s']:.2f} s  = {save_mb_s:.0f} MB/s")
    print(f"dd, same bytes, fsync   {dd:.0f} MB/s")
    for label, step in (("first ", 2), ("steady", 3)):
        print(f"async save, {label}:     blocked {save[f'async_block_s_{step}']:.2f} s to stage + {save[f'async_publish_s_{step}']:.2f} s to publish "
              f"(written and published after {save[f'async_total_s_{step}']:.2f} s)")
    print(f"same, glibc's default:  blocked {blocked(save_libc):.2f} s (no copy tunable; its sync save {save_libc['sync_save_s']:.2f} s)")
    print(f"load (2 ranks)          {load['load_s']:.2f} s")
    print(f"load saved-on-2 on 1    {reshard['load_s']:.2f} s")
    print(
        f"RESULT save_mb_s={save_mb_s:.0f} dd_mb_s={dd:.0f} save_ratio={save_mb_s / dd:.2f} "
        f"async_block_ratio={blocked(save) / sync_s:.3f} "
        f"async_block_ratio_libc_default={blocked(save_libc) / sync_s:.3f} load_s={load['load_s']:.2f} "
        f"reshard_load_s={reshard['load_s']:.2f}"
    )


if __name__ == "__main__":
    main()
