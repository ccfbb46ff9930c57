"""Per-step overhead of `ftl run` against a minimal hand-written DDP loop and HF Trainer, side by side
in one run: the quickstart model and data, 2 processes, the same number of steps. Steps/s counts steps
2..N (start-up excluded) on rank 0. Each runner is run ROUNDS times, alternating, and its best is kept.

Usage: python bench/step_overhead.py [STEPS] [ROUNDS]
Last line: RESULT ftl_vs_hand=.. ftl_vs_trainer=.. ftl_steps_s=.. hand_steps_s=.. trainer_steps_s=..
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]


def ftl_steps_per_s(steps: int, work: Path) -> float:
    run_dir = work / "ftl"
    subprocess.run(
        [str(Path(sys.executable).parent / "ftl"), "run", "configs/quickstart.yaml", f"train.max_steps={steps}",
         f"train.log_every={steps}", "checkpoint.every=0", "data.validation=null", f"output_dir={run_dir}", "--no-resume"],
        cwd=REPO, check=True, capture_output=True,
    )
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    first, last = records[0], records[-1]  # step 1 and step N
    return (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])


def script_steps_per_s(script: str, steps: int, work: Path) -> float:
    out = work / f"{Path(script).stem}.json"
    subprocess.run([*TORCHRUN, script, str(steps), str(out)], cwd=REPO, check=True, capture_output=True)
    return json.loads(out.read_text())["steps_per_s"]


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    best = {"ftl": 0.0, "hand": 0.0, "trainer": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for r in range(rounds):
            for name, measure in (
                ("ftl", lambda: ftl_steps_per_s(steps, work)),
                ("hand", lambda: script_steps_per_s("bench/hand_ddp.py", steps, work)),
                ("trainer", lambda: script_steps_per_s("bench/hf_trainer.py", steps, work)),
            ):
                value = measure()
                best[name] = max(best[name], value)
                print(f"round {r + 1}: {name:8s} {value:7.2f} steps/s", flush=True)
    print(f"{'runner':8s} {'steps/s':>8s}")
    for name, value in best.items():
        print(f"{name:8s} {value:8.2f}")
    print(
        f"RESULT ftl_vs_hand={best['ftl'] / best['hand']:.3f} ftl_vs_trainer={best['ftl'] / best['trainer']:.3f} "
        f"ftl_steps_s={best['ftl']:.2f} hand_steps_s={best['hand']:.2f} trainer_steps_s={best['trainer']:.2f}"
    )


if __name__ == "__main__":
    main()
