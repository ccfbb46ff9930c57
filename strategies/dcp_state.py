"""Model + optimizer state through torch.distributed.checkpoint: shared by DDP and FSDP2.

`get_state_dict` returns each strategy's natural form (full tensors for DDP, DTensor shards for FSDP2),
and DCP reshards on load, so a checkpoint saved on N ranks loads on M ranks and across these strategies.
"""

from __future__ import annotations

import ctypes
import importlib
import pickle
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from strategies.errors import FTLError

WRITER_THREADS = 2


def state_dict_options(trainable_only: bool) -> StateDictOptions:
    # PEFT methods save only what trains (adapters, prompt, new head): the frozen base is rebuilt from
    # its source on resume, and 4-bit base weights are not plain tensors DCP could store.
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def save_model_and_optimizer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    path: Path,
    writer_group: dist.ProcessGroup | None,
    stager: "ReusedBufferStager",
    background: bool = False,
    trainable_only: bool = False,
) -> Future | None:
    """Write model + optimizer under `path`. With `background`, this rank's share of the state is first
    copied to CPU memory (training may then change it) and written by a thread; the returned future
    completes when done. The writer thread coordinates ranks with collectives of its own on
    `writer_group` (gloo), so they never interleave with the training loop's."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=state_dict_options(trainable_only))
    state = {"model": model_sd, "optim": optim_sd}
    if background:
        # Only where it pays (bench/checkpoint.py, 4.2 GB on 2 ranks): a background save then blocks
        # training half as long; a blocking save measured slower with split shares (6.7-7.0 s vs
        # 3.0 s, reproducible, not understood yet), so it keeps DCP's own deduplication.
        state = this_ranks_share(state, dist.get_rank(), dist.get_world_size())
    response = dcp.async_save(state, storage_writer=_writer(path), process_group=writer_group, async_stager=stager)
    future = getattr(response, "upload_completion", response)
    if not background:
        # A blocking save takes the same path and waits: writing from the staged copy measured ~2x
        # faster than dcp.save from the live tensors here (bench/checkpoint.py), at the cost of one
        # host copy of the states, which background saves need anyway.
        future.result()
        return None
    return future


# Replicated tensors smaller than this stay in every rank's share (DCP deduplicates their writes).
SHARE_MIN_BYTES = 2**20


def this_ranks_share(state: dict, rank: int, world_size: int) -> dict:
    """The part of a replicated (DDP) state this rank stages and writes: each large plain tensor goes to
    one rank, balanced by bytes, the same on every rank. DCP would write each replicated tensor once
    anyway (it deduplicates at planning), but only after every rank has copied all of them to CPU;
    splitting first divides the staging copy, and the time a save blocks training, by the world size.
    DCP merges the ranks' items into one checkpoint, so loading (on any world size) is unchanged.
    Sharded (DTensor) entries are already this rank's own and are kept."""
    if world_size == 1:
        return state
    large: list[tuple[tuple, torch.Tensor]] = []

    def collect(node, path: tuple) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                collect(value, (*path, key))
        elif isinstance(node, torch.Tensor) and not isinstance(node, DTensor):
            if node.numel() * node.element_size() >= SHARE_MIN_BYTES:
                large.append((path, node))

    collect(state, ())
    loads = [0] * world_size
    dropped = set()
    for path, tensor in sorted(large, key=lambda item: (-item[1].numel() * item[1].element_size(), str(item[0]))):
        owner = loads.index(min(loads))
        loads[owner] += tensor.numel() * tensor.element_size()
        if owner != rank:
            dropped.add(path)

    def prune(node, path: tuple):
        if isinstance(node, dict):
            return {k: prune(v, (*path, k)) for k, v in node.items() if (*path, k) not in dropped}
        return node

    return prune(state, ())


class ReusedBufferStager:
    """Copies the state into CPU buffers kept from one save to the next (pinned on CUDA), so a background
    save blocks training only for a memcpy. DCP's own stager allocates fresh buffers every time, and
    its caching variant pins memory, which fails without a GPU."""

    _synchronize_after_execute = False  # stage() returns only after the copy is done

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def stage(self, state_dict: dict) -> dict:
        return self._stage(state_dict, "")

    def _stage(self, node, prefix: str):
        if isinstance(node, dict):
            return {key: self._stage(value, f"{prefix}/{key}") for key, value in node.items()}
        if isinstance(node, list):
            return [self._stage(value, f"{prefix}/{i}") for i, value in enumerate(node)]
        if isinstance(node, DTensor):
            local = self._copy(node.to_local(), prefix)
            return DTensor.from_local(local, node.device_mesh, node.placements, run_check=False, shape=node.shape, stride=node.stride())
        if isinstance(node, torch.Tensor):
            return self._copy(node, prefix)
        return node

    def _copy(self, tensor: torch.Tensor, key: str) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            self._buffers[key] = buffer
        tensor = tensor.detach()
        if tensor.device.type == "cpu" and tensor.is_contiguous():
            # Host to host: libc's memmove bypasses the caches for large blocks (see cluster.local
            # NON_TEMPORAL_THRESHOLD) and copied 11 GB/s here against 7 GB/s for Tensor.copy_, which
            # always goes through them; this copy is the whole time a background save blocks training.
            ctypes.memmove(buffer.data_ptr(), tensor.data_ptr(), tensor.numel() * tensor.element_size())
            return buffer
        return buffer.copy_(tensor)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        self._buffers.clear()


def _writer(path: Path) -> dcp.FileSystemWriter:
    # Two writer threads per rank: serialising one tensor overlaps with writing the previous one
    # (bench/checkpoint.py: one thread reaches ~40% of dd's bandwidth on this disk).
    return dcp.FileSystemWriter(str(path), thread_count=WRITER_THREADS)


# What DCP's `.metadata` file may name: the classes of DCP's own metadata, tensor sizes, dtypes and
# layouts, and the path it was saved under.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Loads DCP's `.metadata`, which DCP writes and reads as a plain pickle: any global outside the
    list above is refused, so a crafted checkpoint cannot run code on load (Python's documented
    "restricting globals" recipe; DCP has no safe reader of its own)."""

    def __init__(self, file, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if not _allowed(module, name):
            raise FTLError(
                f"{self.source} asks to load `{module}.{name}`, which a DCP checkpoint's metadata never holds: FTL "
                "refuses to unpickle it. The file was not written by DCP or was tampered with; resume from another "
                "checkpoint (`checkpoint.on_corrupt=previous`) or `--no-resume`."
            )
        return super().find_class(module, name)


def _allowed(module: str, name: str) -> bool:
    if (module, name) in _METADATA_GLOBALS:
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), torch.dtype)
    if module in _METADATA_MODULES:
        value = getattr(importlib.import_module(module), name, None)
        return isinstance(value, type) and value.__module__ == module
    return False


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with the metadata read through `_MetadataUnpickler`; tensors are read by DCP
    with `torch.load(weights_only=True)` already."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream, str(path)).load()
        if not isinstance(metadata, Metadata):
            raise FTLError(f"{path} does not hold DCP checkpoint metadata; resume from another checkpoint or `--no-resume`.")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_model_and_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path, trainable_only: bool = False
) -> None:
    options = state_dict_options(trainable_only)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(path)))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
