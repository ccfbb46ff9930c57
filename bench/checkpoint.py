"""Checkpoint throughput, side by side in one run on the same disk: FTL's sync save of a ~300M-param
model (2 ranks, DDP, weights + AdamW states through DCP) vs `dd` writing the same byte count with
fdatasync; the time an async save blocks training vs a sync save; load time and resume-with-reshard
time (saved on 2 ranks, loaded on 1).

Usage: python bench/checkpoint.py [WORK_DIR]
Last line: RESULT save_mb_s=.. dd_mb_s=.. save_ratio=.. async_block_ratio=.. load_s=.. reshard_load_s=..
"""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = {  # Llama-architecture, ~300M parameters
    "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
}


def torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", "bench/checkpoint_worker.py", *args]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)


def dd_mb_s(path: Path, nbytes: int) -> float:
    block = 16 * 2**20
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={max(1, nbytes // block)}", "conv=fdatasync"],
                   check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    path.unlink()
    return nbytes / elapsed / 1e6


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
    spec_path = work / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    try:
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
    print(f"checkpoint bytes        {save['bytes'] / 1e9:.2f} GB (weights + AdamW states, fp32)")
    print(f"sync save, first        {save['sync_save_s_0']:.2f} s")
    print(f"sync save, steady       {save['sync_save_s']:.2f} s  = {save_mb_s:.0f} MB/s")
    print(f"dd, same bytes, fsync   {dd:.0f} MB/s")
    print(f"async save, first:      blocked {save['async_block_s_2']:.2f} s (total {save['async_total_s_2']:.2f} s; allocates staging buffers)")
    print(f"async save, steady:     blocked {save['async_block_s_3']:.2f} s (total {save['async_total_s_3']:.2f} s)")
    print(f"load (2 ranks)          {load['load_s']:.2f} s")
    print(f"load saved-on-2 on 1    {reshard['load_s']:.2f} s")
    print(
        f"RESULT save_mb_s={save_mb_s:.0f} dd_mb_s={dd:.0f} save_ratio={save_mb_s / dd:.2f} "
        f"async_block_ratio={save['async_block_s_3'] / save['sync_save_s']:.3f} load_s={load['load_s']:.2f} "
        f"reshard_load_s={reshard['load_s']:.2f}"
    )


if __name__ == "__main__":
    main()
