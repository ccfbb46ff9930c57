"""Planner accuracy: predicted vs measured per-rank peak over a matrix of models x methods x strategies
x world sizes. Measured = launcher/measure.py: a real step for the cells marked fake=False, the same step
traced under FakeTensorMode with a fake process group for the rest (an 8B or 70B model at world size 64 is
traced here without allocating it; QLoRA too: bitsandbytes registers fake kernels for its 4-bit ops).
Predicted excludes the fixed CUDA/NCCL overhead, which no tensor tracker sees.

Usage: python bench/plan_accuracy.py [--quick]   (--quick: only the cells that take seconds)
Last line: RESULT cells=N worst_err=E worst_under=U
  (E = max |predicted/measured - 1|, U = max(0, 1 - predicted/measured): how far a plan fell short)
"""

import sys
import time
import warnings

from launcher.accuracy import Cell, compare

CELLS = [
    Cell("tiny", "full", "ddp", 1, 4, 256, "fp32", fake=False),
    Cell("tiny", "full", "fsdp2", 2, 4, 256, "fp32"),
    Cell("tiny", "lora", "ddp", 1, 4, 256, "fp32", fake=False),
    Cell("tiny", "qlora", "ddp", 1, 4, 256, "fp32", fake=False),
    Cell("125m", "qlora", "ddp", 1, 1, 512, "fp32"),
    Cell("125m", "full", "ddp", 1, 4, 1024),
    Cell("125m", "full", "fsdp2", 8, 4, 1024),
    Cell("125m", "lora", "ddp", 1, 4, 1024),
    # FSDP grad-op (ZeRO-2-like: reshard_after_forward=False): DeepSpeed itself cannot run under fake tensors.
    Cell("125m", "full", "fsdp2_gradop", 8, 4, 1024),
    # Short sequences: the optimizer step or the end of backward is the peak, not the activations.
    Cell("125m", "full", "fsdp2", 8, 1, 128),
    Cell("125m", "full", "ddp", 1, 4, 256, num_labels=4),
    Cell("125m", "lora", "fsdp2", 8, 4, 1024, num_labels=4),
    Cell("125m", "qlora", "fsdp2", 2, 2, 1024, activation_checkpointing=True),
    Cell("1b", "full", "fsdp2_gradop", 8, 2, 2048, activation_checkpointing=True),
    Cell("8b", "full", "fsdp2_gradop", 8, 1, 4096, activation_checkpointing=True),
    Cell("1b", "full", "fsdp2", 8, 2, 2048, activation_checkpointing=True),
    Cell("1b", "lora", "fsdp2", 8, 2, 2048),
    Cell("1b", "full", "fsdp2", 64, 1, 4096, activation_checkpointing=True),
    Cell("8b", "full", "fsdp2", 8, 1, 4096, activation_checkpointing=True),
    Cell("8b", "full", "fsdp2", 64, 2, 4096, activation_checkpointing=True),
    Cell("8b", "lora", "fsdp2", 8, 1, 4096, activation_checkpointing=True),
    Cell("8b", "full", "fsdp2", 8, 1, 1024, activation_checkpointing=True),
    Cell("8b", "full", "fsdp2", 8, 4, 512, num_labels=4),
    Cell("llama2-7b", "full", "fsdp2", 8, 1, 4096),
    Cell("llama2-7b", "full", "fsdp2", 64, 2, 4096, activation_checkpointing=True),
    Cell("llama2-7b", "lora", "fsdp2", 8, 1, 512, activation_checkpointing=True),
    Cell("llama2-7b", "full", "fsdp2", 8, 1, 512),
    Cell("llama2-13b", "full", "fsdp2", 8, 1, 4096, activation_checkpointing=True),
    Cell("llama2-13b", "lora", "fsdp2", 64, 1, 4096),
    Cell("mistral-7b", "lora", "fsdp2", 8, 2, 4096, activation_checkpointing=True),
    Cell("mistral-7b", "full", "fsdp2", 64, 1, 2048),
    Cell("8b", "qlora", "fsdp2", 8, 1, 4096, activation_checkpointing=True),
    Cell("70b", "full", "fsdp2", 64, 1, 4096, activation_checkpointing=True),
    Cell("70b", "lora", "fsdp2", 8, 1, 2048, activation_checkpointing=True),
    Cell("70b", "qlora", "fsdp2", 2, 1, 2048, activation_checkpointing=True),
]
QUICK = [c for c in CELLS if c.model in ("tiny", "125m")]


def main() -> None:
    warnings.filterwarnings("ignore")
    cells = QUICK if "--quick" in sys.argv else CELLS
    print(f"{'cell':52s} {'predicted':>10s} {'measured':>10s} {'ratio':>6s}  {'peak at':15s} time")
    worst, under = 0.0, 0.0
    for cell in cells:
        start = time.perf_counter()
        result = compare(cell)
        worst = max(worst, abs(result.ratio - 1))
        under = max(under, 1 - result.ratio)
        print(
            f"{cell.label:52s} {result.predicted_peak / 2**30:8.3f}Gi {result.measured.peak / 2**30:8.3f}Gi "
            f"{result.ratio:6.3f}  {result.predicted.peak_moment:15s} {time.perf_counter() - start:4.0f}s",
            flush=True,
        )
    print(f"RESULT cells={len(cells)} worst_err={worst:.3f} worst_under={under:.3f}")


if __name__ == "__main__":
    main()
