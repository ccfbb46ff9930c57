"""Initial values for a model that was built on the meta device, sharded, then allocated (FSDP2): every
rank writes only its own shard of each parameter, so no rank ever holds the whole model.

Values come from a local safetensors folder (each rank reads only its rows of each tensor) or a seeded
random init; then the parameters the job adds get their own init: LoRA adapters (PEFT's rule: A random,
B zero), prompts, and a new task head a causal-LM folder does not have. QLoRA's 4-bit layers are
quantised here one weight at a time: the rank reads the whole weight (quantisation constants cover the
whole tensor and every rank needs them to dequantise what it gathers), quantises it on its device with
bitsandbytes, keeps its slice of the packed data and the constants, and drops the rest.

PEFT inserts path components into parameter names (`.base_layer`, `.modules_to_save.default`); names
are matched to the folder's keys on the wrapped Hugging Face model, where only those differ.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor

from launcher.errors import FTLError
from launcher.methods import hf_model, init_prompt_from_text

# PEFT's inserted path components; removing them gives the name in the original model's state dict.
_PEFT_COMPONENTS = re.compile(r"\.(base_layer|original_module|modules_to_save\.[^.]+)(?=\.)")
_ADAPTER = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


@dataclass(frozen=True)
class FourBit:
    """How QLoRA's 4-bit layers quantise (bitsandbytes' `quantize_4bit` arguments)."""

    quant_type: str  # "nf4" | "fp4"
    double_quant: bool
    compute_dtype: torch.dtype
    blocksize: int = 64  # bitsandbytes' and transformers' default


@dataclass(frozen=True)
class ModelWeights:
    """What a meta-built model is filled with. `folder`: a HF folder's safetensors, or None for a random
    init (seeded by `seed` and the rank). `new_modules`: modules the job adds (a classification head),
    named in the Hugging Face model (under any PEFT wrapper), initialised by the model's own rule when
    the folder lacks them. `device`: where 4-bit weights are quantised and their constants live (the
    compute device, also under CPU offload)."""

    folder: Path | None
    seed: int
    rank: int
    device: torch.device
    new_modules: tuple[str, ...] = ()
    four_bit: FourBit | None = None
    prompt_token_ids: tuple[int, ...] = ()  # prompt tuning's text init, as token ids

    def fill(self, model: torch.nn.Module) -> None:
        hf = hf_model(model)
        if self.folder is None:
            self._init_random(hf)
        else:
            self._load(hf)
        self._init_adapters(model)

    # -- the base model ----------------------------------------------------------------------------
    def _init_random(self, hf: torch.nn.Module) -> None:
        """The model's own init rule on each rank's shards, seeded per rank so that the shards of one
        tensor are independent draws rather than copies."""
        if _four_bit_layers(hf):
            raise RuntimeError("a random 4-bit base is built whole (launcher/trainer.py), never on meta")
        torch.manual_seed(self.seed + self.rank)
        # `_init_weights` is the per-module rule; `initialize_weights()` would skip every module already
        # flagged initialised by from_config, which under meta init means all of them.
        with warnings.catch_warnings():  # on a CPU mesh each rank draws its local shard itself: intended
            warnings.filterwarnings("ignore", message="DTensor random operators")
            hf.apply(hf._init_weights)

    def _load(self, hf: torch.nn.Module) -> None:
        files = sorted(Path(self.folder).glob("*.safetensors"))
        if not files:
            raise FTLError(f"The model folder {self.folder} has no *.safetensors files; FSDP2 loads weights from safetensors.")
        four_bit = {f"{name}.weight": module for name, module in _four_bit_layers(hf)}
        by_key: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for name, param in hf.named_parameters():
            if not _ADAPTER.search(f".{name}."):  # adapters are the method's own, never in the folder
                by_key.setdefault(checkpoint_key(name), []).append((name, param))
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as fh:
                for key in fh.keys():
                    for name, param in by_key.pop(key, []):
                        if name in four_bit:
                            self._quantise_into(four_bit[name], fh.get_tensor(key))
                        else:
                            _copy_rows(param, fh.get_slice(key))
        tied = _tied_keys(hf)
        missing = [name for key, params in by_key.items() if key not in tied for name, _ in params]
        unexpected = [name for name in missing if not self._is_new(name)]
        if unexpected:
            raise FTLError(
                f"The safetensors in {self.folder} lack {len(unexpected)} parameters of the model, e.g. "
                f"{[checkpoint_key(n) for n in unexpected[:3]]}: the folder is not this architecture's weights, or is incomplete."
            )
        torch.manual_seed(self.seed)
        for name in missing:  # a new task head: the model's own init rule, the same on every rank
            hf._init_weights(hf.get_submodule(name.rsplit(".", 1)[0]))

    def _is_new(self, name: str) -> bool:
        key = checkpoint_key(name)
        return any(key.startswith(checkpoint_key(f"{head}.")) for head in self.new_modules)

    def _quantise_into(self, module: torch.nn.Module, full: torch.Tensor) -> None:
        """Quantise one whole weight on the compute device; keep this rank's rows of the packed data and
        all of the constants (on the module, where bitsandbytes looks for them after FSDP2's all-gather
        replaced the parameter object)."""
        import bitsandbytes.functional as bnbf

        spec = self.four_bit
        weight = module.weight
        full = full.to(device=self.device, dtype=spec.compute_dtype)
        packed, state = bnbf.quantize_4bit(
            full, blocksize=spec.blocksize, compress_statistics=spec.double_quant, quant_type=spec.quant_type, quant_storage=weight.dtype
        )
        del full
        _copy_rows(weight, packed)
        module.quant_state = state

    # -- what the method adds ----------------------------------------------------------------------
    def _init_adapters(self, model: torch.nn.Module) -> None:
        """LoRA adapters and prompts start as PEFT starts them, so step 0 is the base model's output."""
        torch.manual_seed(self.seed + self.rank)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="DTensor random operators")
            for module in model.modules():
                if hasattr(module, "reset_lora_parameters") and hasattr(module, "lora_A"):
                    for adapter in module.lora_A:
                        module.reset_lora_parameters(adapter, True)
            for encoder in getattr(model, "prompt_encoder", {}).values():
                encoder.embedding.reset_parameters()
        for wrapper in model.modules():  # PEFT's trained copy of a head starts equal to the head itself
            if hasattr(wrapper, "original_module") and hasattr(wrapper, "modules_to_save"):
                for copy in wrapper.modules_to_save.values():
                    with torch.no_grad():
                        for ours, theirs in zip(copy.parameters(), wrapper.original_module.parameters()):
                            ours.copy_(theirs)
        if self.prompt_token_ids:
            init_prompt_from_text(model, list(self.prompt_token_ids))


def checkpoint_key(name: str) -> str:
    """A parameter's name in the un-wrapped model's state dict: PEFT's inserted components removed."""
    return _PEFT_COMPONENTS.sub("", name)


@contextmanager
def full_value(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """A parameter's whole value while the context lasts: gathered if it is an FSDP2 shard, or a ZeRO-3
    partition (which DeepSpeed gathers in place and partitions again on exit)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            yield param.data
    else:
        yield param.full_tensor() if isinstance(param, DTensor) else param


@torch.no_grad()
def set_full_value(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write a whole value into a parameter; a shard keeps only its own part."""
    if isinstance(param, DTensor):
        _copy_rows(param, value)
    else:
        param.copy_(value.to(param.device, param.dtype))


@torch.no_grad()
def _copy_rows(param: torch.Tensor, source) -> None:
    """Copy this rank's part of `source` (a tensor, or a safetensors slice read lazily) into `param`.
    FSDP2 shards dim 0 only, so a rank's part is a range of rows (HSDP: the same range on every replica)."""
    if isinstance(param, DTensor):
        local = param.to_local()
        if local.numel() == 0:  # fewer rows than ranks: this rank holds none
            return
        start = _row_offset(param)
        rows = source[start : start + local.shape[0]]
        local.copy_(rows.to(local.dtype) if isinstance(rows, torch.Tensor) else rows)
    else:
        param.copy_(source[:] if not isinstance(source, torch.Tensor) else source)


def _row_offset(param: DTensor) -> int:
    # DTensor's own layout arithmetic (what DCP uses to place shards), rather than re-deriving torch.chunk's.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[0] if offset else 0


def _four_bit_layers(hf: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in hf.named_modules() if type(m).__name__ == "Linear4bit"]


def _tied_keys(hf: torch.nn.Module) -> set[str]:
    tied = getattr(hf, "all_tied_weights_keys", None) or {}
    return set(tied)
