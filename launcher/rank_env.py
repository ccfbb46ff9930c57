"""The launcher <-> rank contract: what torchrun (or Slurm, or Ray) tells each process, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RankEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    # The CUDA device index this rank uses when its host chose it (Ray Train: `ray.train.torch.get_device()`;
    # its workers on a node share one CUDA_VISIBLE_DEVICES whose order need not follow the local ranks);
    # otherwise the local rank.
    device_index: int | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "RankEnv":
        env = os.environ if env is None else env
        return cls(
            rank=int(env.get("RANK", 0)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))),
        )

    def to_env(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
        }

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda_index(self) -> int:
        return self.local_rank if self.device_index is None else self.device_index


# `ftl --verbose`: third-party warnings and notices are shown instead of hidden (launcher/quiet.py). The CLI
# sets it in its own environment, which torchrun's ranks and an sbatch job inherit; Ray's runtime_env
# forwards it (cluster/ray.py).
VERBOSE_ENV = "FTL_VERBOSE"


def verbose_requested(env: dict[str, str] | None = None) -> bool:
    return (os.environ if env is None else env).get(VERBOSE_ENV) == "1"
