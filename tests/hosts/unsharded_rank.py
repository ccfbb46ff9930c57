"""For tests: how many transformer blocks hold unsharded parameters at each block's backward, in a real
FSDP2 run. The train entry's own build and step (`Trainer.build`, `Trainer.train_step`) on the plan in
the run dir; hooks only observe. Usage: torchrun ... -m tests.hosts.unsharded_rank RUN_DIR STEPS OUT_JSON

FSDP2 swaps a module's parameter attributes between the sharded DTensor and the unsharded tensor as it
gathers and frees them, so a block whose parameters are plain tensors right now is unsharded right now.
"""

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


class UnshardedBlocks:
    """Counts, inside every block's backward, the blocks whose parameters are currently unsharded. The
    hook sits on the block's last sub-module with parameters (Llama: the MLP): its backward starts after
    FSDP2 has gathered the block for backward (a hook on the block itself can fire before that)."""

    def __init__(self, blocks: list[torch.nn.Module]) -> None:
        self.blocks = blocks
        self.counts: list[int] = []
        inner = [[m for m in b.children() if any(True for _ in m.parameters())][-1] for b in blocks]
        self.handles = [m.register_full_backward_pre_hook(self._at_backward) for m in inner]

    def unsharded(self) -> int:
        return sum(any(not isinstance(p, DTensor) for p in b.parameters()) for b in self.blocks)

    def _at_backward(self, module, grad_output):
        self.counts.append(self.unsharded())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def main() -> None:
    from launcher.job import RankJob
    from launcher.rank_env import RankEnv
    from launcher.runtime import RankRuntime, resolve_device
    from launcher.stop import PolledStop
    from launcher.trainer import Trainer

    run_dir, steps, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    job, env = RankJob.read(run_dir), RankEnv.from_env()
    device = resolve_device(job.plan.request.device, env.local_rank, str(run_dir / "plan.json"))
    runtime = RankRuntime.start(env, device, job.plan.request.precision, 120)
    trainer = Trainer(job, job.plan, runtime, PolledStop(lambda: False))
    trainer.build()
    counter = UnshardedBlocks(trainer.blocks)
    losses = [trainer.train_step(step)[0].item() for step in range(1, steps + 1)]
    every = [None] * env.world_size
    dist.all_gather_object(every, {"counts": counter.counts, "blocks": len(trainer.blocks), "losses": losses}, group=runtime.control)
    if env.rank == 0:
        out.write_text(json.dumps(every))
    counter.remove()
    trainer.close()
    gc.collect()  # the model and its wrappers go before the groups they use (as launcher.entries.run_rank)
    runtime.close()


if __name__ == "__main__":
    main()
