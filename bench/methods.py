"""Every fine-tuning method on the tiny Llama (causal LM, random init) and on the pretrained MiniLM
(4-class topic classification): trainable parameters, model-state and peak memory measured by the run,
step time, and the final validation metric. Real `ftl run`s, one process each, same data and steps.

    python bench/methods.py [tiny_steps] [minilm_steps]

Prints one table, then `RESULT methods=N` (N = method x model rows that ran).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FTL = str(Path(sys.executable).parent / "ftl")

TINY_METHODS = {
    "full": [],
    "lora r=16": ["method.name=lora"],
    "qlora r=16": ["method.name=qlora"],
    "prompt_tuning 20": ["method.name=prompt_tuning"],
    "freeze 2 of 4 blocks": ["method.name=freeze", "method.freeze.blocks=2"],
    "gradual every 25": ["method.name=gradual_unfreezing", "method.gradual_unfreezing.every_steps=25"],
}
MINILM_METHODS = {
    "full": [],
    "feature extraction": ["method.name=freeze"],
    "freeze 3 of 6 blocks": ["method.name=freeze", "method.freeze.blocks=3"],
    "lora r=16": ["method.name=lora", "train.lr=2e-3"],
    "qlora r=16": ["method.name=qlora", "train.lr=2e-3"],
    "prompt_tuning 20": ["method.name=prompt_tuning", "train.lr=2e-2"],
    "gradual every 8": ["method.name=gradual_unfreezing", "method.gradual_unfreezing.every_steps=8"],
}


def run(config: str, overrides: list[str], out: Path) -> dict:
    argv = [FTL, "run", config, f"output_dir={out}", "hardware.gpus_per_node=1", "checkpoint.every=0", *overrides]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1][:120]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plan = json.loads((out / "plan.json").read_text())
    logged = [r for r in records if "loss" in r and "elapsed_s" in r]
    steps = logged[-1]["step"] - logged[0]["step"]
    step_ms = 1000 * (logged[-1]["elapsed_s"] - logged[0]["elapsed_s"]) / max(steps, 1)
    memory = next(r for r in records if r.get("event") == "memory")
    final = [r for r in records if "val_loss" in r][-1]
    return {
        "trainable": plan["params_trainable"],
        "total": plan["params_total"],
        "state_mb": (memory["param_bytes"] + memory["grad_bytes"] + memory["optimizer_bytes"]) / 2**20,
        "peak_rss_mb": memory["peak_rss_bytes"] / 2**20,
        "step_ms": step_ms,
        "metric": final.get("accuracy", final["val_loss"]),
        "metric_name": "val_acc" if "accuracy" in final else "val_loss",
    }


def main() -> None:
    tiny_steps = int(sys.argv[1]) if len(sys.argv) > 1 else 150
    minilm_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftl-bench-methods-") as tmp:
        tiny = [
            f"train.max_steps={tiny_steps}", "train.log_every=10", "train.eval_every=0",
            "model.config.tie_word_embeddings=false",  # freeze/gradual train the LM head apart from the embeddings
        ]
        for name, extra in TINY_METHODS.items():
            rows.append(("tiny-llama", name, run("configs/quickstart.yaml", tiny + extra, Path(tmp) / f"tiny-{len(rows)}")))
        minilm = [f"train.max_steps={minilm_steps}", "train.eval_every=0", f"train.warmup_steps={max(minilm_steps // 10, 1)}"]
        for name, extra in MINILM_METHODS.items():
            rows.append(("minilm", name, run("configs/minilm-classify.yaml", minilm + extra, Path(tmp) / f"minilm-{len(rows)}")))

    header = f"{'model':<11}{'method':<22}{'trainable':>12}{'share':>8}{'states MiB':>11}{'peak RSS MiB':>13}{'step ms':>9}  metric"
    print(header)
    print("-" * len(header))
    ran = 0
    for model, method, r in rows:
        if "error" in r:
            print(f"{model:<11}{method:<22}  failed: {r['error']}")
            continue
        ran += 1
        print(
            f"{model:<11}{method:<22}{r['trainable']:>12,}{r['trainable'] / r['total']:>8.2%}{r['state_mb']:>11.1f}"
            f"{r['peak_rss_mb']:>13.0f}{r['step_ms']:>9.1f}  {r['metric_name']}={r['metric']:.4f}"
        )
    print(f"RESULT methods={ran}")


if __name__ == "__main__":
    main()
