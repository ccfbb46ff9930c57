"""A rank's runtime: where it runs (rank env, device, dtype) and its process groups.

Whoever starts the ranks owns the default process group: torchrun does not create one, so the runtime
creates it; Ray Train does, so the runtime adopts it. The runtime tears down only what it created
(torchtitan's distributed/utils.py does the same). On CUDA the default group has a backend for each
device type, `cpu:gloo,cuda:nccl` (as torchtitan and torchtune ask): FTL's control collectives (the stop
flag, the first-step gradient check, evaluation sums) use CPU tensors, which a group backed by NCCL
alone refuses. Those collectives also get a gloo group of their own (`control`), as do background
checkpoint writers (`writer`): a writer thread's collectives must never interleave with the loop's.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from launcher.errors import FTLError
from launcher.rank_env import RankEnv
from strategies.base import RankContext


def default_group_backend(device_type: str) -> str:
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def resolve_device(planned: str, index: int, plan_file: str) -> torch.device:
    """The plan's device on this rank: CUDA device `index` (RankEnv.cuda_index: the local rank, or the one
    the host chose). A cuda plan on a machine without CUDA (or with fewer devices than ranks on the node)
    stops here, before anything is written or any group is joined."""
    if planned != "cuda":
        return torch.device("cpu")
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= have:
        found = "no CUDA device" if have == 0 else f"{have} CUDA device(s), and this rank is to use device {index}"
        raise FTLError(
            f"The plan {plan_file} was made for CUDA GPUs, but this rank's machine has {found}. Ranks run exactly "
            "the plan they are given: run the job where its GPUs are, or re-plan for this machine with "
            "`ftl run JOB.yaml hardware.device=cpu` (or `--gpus N` for the GPUs it has)."
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def check_precision(device: torch.device, precision: str, plan_file: str) -> None:
    """bf16 (the plan's default on CUDA) on a GPU without bf16 arithmetic (before Ampere: V100, T4) would not
    fail: torch emulates it, many times slower. Stop instead, before anything is written."""
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        major, minor = torch.cuda.get_device_capability(device)
        raise FTLError(
            f"The plan {plan_file} trains in bf16, but this rank's GPU ({torch.cuda.get_device_name(device)}, compute "
            f"capability {major}.{minor}) has no bf16 arithmetic; torch would emulate it, many times slower. Train in "
            "fp32 there (`train.precision: fp32`, then `ftl run` again), or run on Ampere or newer GPUs."
        )


@dataclass
class RankRuntime:
    env: RankEnv
    device: torch.device
    compute_dtype: torch.dtype
    control: dist.ProcessGroup  # gloo, main thread only: stop agreement, checks, metrics
    writer: dist.ProcessGroup  # gloo, for background checkpoint writer threads
    owns_default_group: bool
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def start(cls, env: RankEnv, device: torch.device, precision: str, timeout_s: float) -> "RankRuntime":
        """Join the job's process group: adopt the one that exists (Ray Train's), or create it (torchrun's
        environment: MASTER_ADDR/PORT, RANK, WORLD_SIZE). Collective: every rank calls it."""
        timeout = datetime.timedelta(seconds=timeout_s)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(default_group_backend(device.type), timeout=timeout)
        elif dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise FTLError(
                f"The existing process group has rank {dist.get_rank()} of {dist.get_world_size()}, but the environment "
                f"says rank {env.rank} of {env.world_size} (RANK/WORLD_SIZE). Start ranks with one launcher only."
            )
        control = dist.new_group(backend="gloo", timeout=timeout)
        writer = dist.new_group(backend="gloo", timeout=timeout)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return cls(env, device, dtype, control, writer, owns)

    @property
    def ctx(self) -> RankContext:
        return RankContext(
            rank=self.env.rank, world_size=self.env.world_size, device=self.device, compute_dtype=self.compute_dtype,
            writer_group=self.writer,
        )

    def any_true(self, flag: bool) -> bool:
        """Whether `flag` holds on some rank (collective on the control group, CPU tensor)."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)
        return value.item() == 1

    def first_text(self, text: str | None, limit: int = 512) -> str | None:
        """The lowest rank's non-empty `text` (UTF-8, cut to `limit` bytes), the same on every rank; None if
        no rank has one. Collective on the control group. Fixed-size byte tensors rather than
        all_gather_object, so nothing received is unpickled."""
        mine = torch.zeros(limit, dtype=torch.uint8)
        raw = (text or "").encode()[:limit]
        if raw:
            mine[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        every = [torch.zeros_like(mine) for _ in range(self.env.world_size)]
        dist.all_gather(every, mine, group=self.control)
        for got in every:
            data = bytes(got.tolist()).rstrip(b"\0")
            if data:
                return data.decode(errors="replace")
        return None

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks of a CPU tensor (gloo has no AVG)."""
        values = values.detach().to("cpu", copy=True)
        dist.all_reduce(values, group=self.control)
        return values

    def close(self) -> None:
        """Destroy the groups this runtime created; the default group only if it created it too.
        Call after the training objects are gone: a DDP reducer freed after its group was destroyed joins
        the group's threads in its destructor and can hang (seen here)."""
        if self._closed or not dist.is_initialized():
            return
        self._closed = True
        if self.owns_default_group:
            dist.destroy_process_group()  # takes every subgroup with it
            return
        for group in (self.writer, self.control):
            dist.destroy_process_group(group)
