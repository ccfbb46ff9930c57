"""Planner accuracy: predicted vs measured per-rank peak over a matrix of models x methods x strategies
x world sizes. Measured = launcher/measure.py: a real step for the tiny cells, the same step traced
under FakeTensorMode with a fake process group for the rest (an 8B or 70B model at world size 64 is
traced here without allocating it). Predicted excludes the fixed CUDA/NCCL overhead, which no tensor
tracker sees.

4-bit (QLoRA) cells run a real step on this CPU.

Usage: python bench/plan_accuracy.py [--quick]   (--quick: only the cells that take seconds)
Last line: RESULT cells=N worst_err=E   (E = max |predicted/measured - 1|)
"""

import sys
import time
import warnings

from launcher.accuracy import Cell, compare

CELLS = [
    Cell("tiny", "full", "ddp", 1, 4, 256, "fp32", fake=False),
    Cell("tiny", "full", "fsdp2", 2, 4, 256, "fp32"),
    Cell("tiny", "lora", "ddp", 1, 4, 256, "fp32", fake=False),
    # QLoRA: real 4-bit steps (bitsandbytes has no fake-tensor kernels), so CPU-sized models only.
    Cell("tiny", "qlora", "ddp", 1, 4, 256, "fp32", fake=False),
    Cell("125m", "qlora", "ddp", 1, 1, 512, "fp32", fake=False),
    Cell("125m", "full", "ddp", 1, 4, 1024),
    Cell("125m", "full", "fsdp2", 8, 4, 1024),
    Cell("125m", "lora", "ddp", 1, 4, 1024),
    # FSDP grad-op (ZeRO-2-like: reshard_after_forward=False): DeepSpeed itself cannot run under fake tensors.
    Cell("125m", "full", "fsdp2_gradop", 8, 4, 1024),
    Cell("1b", "full", "fsdp2_gradop", 8, 2, 2048, activation_checkpointing=True),
    Cell("8b", "full", "fsdp2_gradop", 8, 1, 4096, activation_checkpointing=True),
    Cell("1b", "full", "fsdp2", 8, 2, 2048, activation_checkpointing=True),
    Cell("1b", "lora", "fsdp2", 8, 2, 2048),
    Cell("1b", "full", "fsdp2", 64, 1, 4096, activation_checkpointing=True),
    Cell("8b", "full", "fsdp2", 8, 1, 4096, activation_checkpointing=True),
    Cell("8b", "full", "fsdp2", 64, 2, 4096, activation_checkpointing=True),
    Cell("8b", "lora", "fsdp2", 8, 1, 4096, activation_checkpointing=True),
    Cell("70b", "full", "fsdp2", 64, 1, 4096, activation_checkpointing=True),
    Cell("70b", "lora", "fsdp2", 8, 1, 2048, activation_checkpointing=True),
]
QUICK = [c for c in CELLS if c.model in ("tiny", "125m")]


def main() -> None:
    warnings.filterwarnings("ignore")
    cells = QUICK if "--quick" in sys.argv else CELLS
    print(f"{'cell':48s} {'predicted':>10s} {'measured':>10s} {'ratio':>6s}  peak at      time")
    worst = 0.0
    for cell in cells:
        start = time.perf_counter()
        result = compare(cell)
        worst = max(worst, abs(result.ratio - 1))
        print(
            f"{cell.label:48s} {result.predicted_peak / 2**30:8.3f}Gi {result.measured.peak / 2**30:8.3f}Gi "
            f"{result.ratio:6.3f}  {result.predicted.peak_moment:12s} {time.perf_counter() - start:4.0f}s",
            flush=True,
        )
    print(f"RESULT cells={len(cells)} worst_err={worst:.3f}")


if __name__ == "__main__":
    main()
