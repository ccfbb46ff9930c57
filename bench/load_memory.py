"""Peak host memory of each rank while building and loading a ~1.1B-parameter model (TinyLlama-1.1B's
shape) from a local safetensors folder under FSDP2 on 2 CPU ranks, for full fine-tuning, LoRA and QLoRA,
side by side in one run. Each rank runs the train entry's own build (bench/load_memory_rank.py).

Figure: the growth of a rank's anonymous resident memory during the build (peak minus before), as a
fraction of the model's bytes as a plain build holds them (fp32: 4 B a parameter). Goal <= 0.6: each rank
holds its half plus about one tensor; QLoRA's shards are 4-bit, so its fraction is far lower. Printed
beside it: the safetensors pages mapped while reading (file-backed page cache, droppable and shared by the
ranks on a node; a rank touches only its rows, except for 4-bit weights, which it reads whole).

Usage: python bench/load_memory.py [WORK_DIR]   (the model folder is cached in WORK_DIR, default /tmp/ftl-load-memory)
Last line: RESULT full_frac=.. lora_frac=.. qlora_frac=..
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from cluster.local import job_env
from launcher.job import prepare_run_dir
from launcher.cli import make_job_plan
from launcher.spec import spec_from_dict

REPO = Path(__file__).resolve().parents[1]
MODEL = {  # TinyLlama-1.1B's architecture
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
    "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
}
METHODS = {"full": {"name": "full"}, "lora": {"name": "lora", "lora": {"r": 16}}, "qlora": {"name": "qlora", "lora": {"r": 16}}}


def model_folder(work: Path) -> tuple[Path, int]:
    folder = work / "tinyllama-1.1b-random"
    if not (folder / "config.json").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**MODEL)).to(torch.bfloat16)  # stored in bf16, as published models are
        model.save_pretrained(folder)
        del model
    from transformers import AutoConfig, AutoModelForCausalLM
    from accelerate import init_empty_weights

    with init_empty_weights():
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).parameters())
    return folder, params


def build_on_two_ranks(work: Path, folder: Path, method: dict) -> list[dict]:
    spec = spec_from_dict({
        "model": {"name_or_path": str(folder), "init": "pretrained"},
        "method": method,
        "data": {"train": str(REPO / "configs/data/quickstart.jsonl")},
        "train": {"max_steps": 1, "lr": 1e-4, "seq_len": 64, "micro_batch_size": 1},
        "hardware": {"gpus_per_node": 2, "device": "cpu", "gpu_mem": "24GB"},
        "strategy": "fsdp2",
        "output_dir": str(work / f"run-{method['name']}"),
    })
    prepare_run_dir(spec, make_job_plan(spec), fresh=True, say=lambda _: None)
    out = work / f"rss-{method['name']}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "bench/load_memory_rank.py", str(spec.output_dir), str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=job_env("cpu", dict(os.environ)))
    return json.loads(out.read_text())


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ftl-load-memory")
    work.mkdir(parents=True, exist_ok=True)
    folder, params = model_folder(work)
    model_bytes = 4 * params
    print(f"model {params / 1e9:.2f}B params, {model_bytes / 2**30:.2f} GiB in fp32; FSDP2 on 2 CPU ranks")
    print(f"{'method':8s} {'rank':>4s} {'peak growth':>12s} {'frac':>6s} {'held after':>11s} {'file pages':>11s} {'build':>7s}")
    fracs = {}
    for name, method in METHODS.items():
        ranks = build_on_two_ranks(work, folder, method)
        for r in ranks:
            growth = r["anon_peak"] - r["anon_before"]
            print(f"{name:8s} {r['rank']:4d} {growth / 2**30:10.2f}Gi {growth / model_bytes:6.3f} "
                  f"{(r['anon_after'] - r['anon_before']) / 2**30:9.2f}Gi {r['file_peak'] / 2**30:9.2f}Gi {r['build_s']:6.1f}s", flush=True)
        fracs[name] = max(r["anon_peak"] - r["anon_before"] for r in ranks) / model_bytes
    print(f"RESULT full_frac={fracs['full']:.3f} lora_frac={fracs['lora']:.3f} qlora_frac={fracs['qlora']:.3f}")


if __name__ == "__main__":
    main()
