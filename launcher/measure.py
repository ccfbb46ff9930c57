"""Measure the per-rank peak memory of real training steps, split by kind, to check the planner.

Two modes, one code path:
- real: the model is allocated on this machine and trained for a few steps (world size 1 here);
- fake: the same steps run under `FakeTensorMode` with torch's fake process group, so an 8B or 70B
  model at world size 8 or 64 is traced on a laptop without allocating its weights (the approach of
  torchtitan's memory estimation). The DeviceMesh is built outside fake mode on a "cpu" mesh. QLoRA
  too: bitsandbytes registers fake kernels for its 4-bit ops (a 70B QLoRA step traces in minutes).
Memory is counted by torch's own trackers (`MemTracker`, `FSDPMemTracker`), which attribute every
tensor storage to parameters, gradients, optimizer states, activations or temporaries.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

from launcher.model_info import transformer_blocks

MEASURABLE = ("ddp", "fsdp2", "fsdp2_gradop")


@dataclass(frozen=True)
class MeasuredMemory:
    params: int
    grads: int
    optimizer: int
    activations: int
    temporaries: int
    other: int
    peak: int
    trainable_state: int = 0  # this rank's trainable parameters + their optimizer states, after the steps

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer


class StoragePeak(TorchDispatchMode):
    """Peak bytes of live tensor storages while active: every storage an op creates is counted until it
    is freed. Used where torch's MemTracker cannot follow (it hooks the gradient of every parameter,
    which fails on frozen ones, e.g. a LoRA base model under DDP). Not for FSDP2: it frees unsharded
    parameters with `untyped_storage().resize_(0)`, which is no op this mode sees, while the storage
    object lives on, so every block's unsharded weights would look alive to the end of backward
    (FSDPMemTracker follows FSDP2's own hooks and handles frozen parameters)."""

    def __init__(self, *existing: torch.Tensor) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0
        for tensor in existing:
            self._add(tensor)

    def _add(self, tensor: torch.Tensor) -> None:
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()  # torch keeps one Python object per storage while it lives
        key = id(storage)
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._drop(key))

    def _drop(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)
        return out


@dataclass(frozen=True)
class StepSetup:
    config: PretrainedConfig
    strategy: str  # one of MEASURABLE; fsdp2_gradop = FSDP2 without resharding after forward (ZeRO-2-like)
    world_size: int
    micro_batch_size: int
    seq_len: int
    precision: str = "fp32"  # "bf16": FSDP2 mixed precision / DDP autocast, as on a GPU
    activation_checkpointing: bool = False
    lora_rank: int = 0  # > 0: LoRA on every Linear of the blocks; the base is frozen (bf16 under bf16)
    lora_dropout: float = 0.0  # on each adapter's input, as `method.lora.dropout`
    # QLoRA: the block Linears in 4-bit NF4 (bitsandbytes' Linear4bit), packed in the compute dtype so that
    # FSDP2 can shard them; real or fake steps (bitsandbytes registers fake kernels for its 4-bit ops).
    quantized: bool = False
    num_labels: int = 0  # > 0: sequence classification with a new head of num_labels outputs, no LM head
    fake: bool = True
    steps: int = 2  # the first runs untracked (see _trace)
    # The job's own model builder (launcher.modeling.build_model with the method applied): on the meta
    # device for fake steps (materialised as fake tensors), real for real ones. When given, the traced
    # model is the one `ftl run` trains, not one rebuilt here from `config`, `lora_rank`, `quantized`.
    build: Callable[[], torch.nn.Module] | None = None


def measure_step(setup: StepSetup) -> MeasuredMemory:
    """Peak memory of one rank in a training step that follows `setup.steps - 1` untracked ones (so that
    optimizer states exist, as in every step but the first)."""
    if setup.strategy not in MEASURABLE:
        raise ValueError(f"cannot measure {setup.strategy!r}; measurable: {MEASURABLE}")
    if setup.quantized and not (setup.lora_rank or setup.build):
        raise ValueError("4-bit models are measured with LoRA adapters (QLoRA)")
    if setup.quantized and setup.fake and setup.build is not None:
        raise ValueError("a job's own 4-bit model is measured in real steps; fake 4-bit steps use the model built here")
    _register_causal_only_attention()
    with _process_group(setup):
        mesh = None
        if setup.strategy != "ddp":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (setup.world_size,))  # outside fake mode
        prebuilt = None
        if setup.build is not None:
            with torch.device("meta") if setup.fake else contextlib.nullcontext():
                prebuilt = setup.build()
        elif setup.fake and (setup.lora_rank or setup.quantized):
            # PEFT moves adapters with Module.to(), and bitsandbytes' Linear4bit makes a Params4bit, neither
            # of which can wrap fake tensors: build on the meta device and materialise inside the mode.
            with torch.device("meta"):
                prebuilt = _build_model(setup)
        if setup.quantized:
            _build_dynamic_map()
        with _fake_mode() if setup.fake else contextlib.nullcontext():
            if prebuilt is not None and setup.fake:
                _materialize(prebuilt)
            model = prebuilt or _build_model(setup)
            if setup.quantized and setup.build is None:
                _pack_4bit(model, torch.bfloat16 if setup.precision == "bf16" else torch.float32)
            return _trace(setup, mesh, model)


def _materialize(model: torch.nn.Module) -> None:
    """Give every parameter and buffer of a meta-device model a (fake, inside the mode) CPU tensor, one
    module slot at a time, keeping shared parameters shared. `Module.to_empty` cannot: from meta it gives each
    module its own copy of a tied parameter (an untied Llama-3.2-1B head: +0.5 GiB gathered in bf16), and it
    swaps tensors in place, which PEFT's prompt-tuning wrapper (weak references to the embeddings) refuses."""
    done: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in done:
                    done[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad)
                module._parameters[name] = done[id(param)]
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = torch.empty_like(buf, device="cpu")


def _build_model(setup: StepSetup) -> torch.nn.Module:
    torch.manual_seed(0)
    if setup.num_labels:
        config = copy.deepcopy(setup.config)
        config.num_labels = setup.num_labels
        config.pad_token_id = 0  # HF pools the last non-padding token, so a classifier needs a pad id; any will do
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32, attn_implementation=CAUSAL_ONLY)
    else:
        model = AutoModelForCausalLM.from_config(setup.config, dtype=torch.float32, attn_implementation=CAUSAL_ONLY)
    model.config.use_cache = False
    if setup.quantized:
        _swap_in_linear4bit(model, torch.bfloat16 if setup.precision == "bf16" else torch.float32)
    if setup.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if setup.lora_rank:
        model = _with_lora(model, setup)
    return model


def _swap_in_linear4bit(model: torch.nn.Module, compute: torch.dtype) -> None:
    """Replace every Linear of the blocks by bitsandbytes' Linear4bit (NF4, double-quantised constants, storage
    in the compute dtype as FSDP-QLoRA needs), still holding the unquantised weight: `_pack_4bit` quantises it
    once the model is materialised."""
    import bitsandbytes as bnb

    for block in transformer_blocks(model):
        for name, linear in list(block.named_modules()):
            if type(linear) is not torch.nn.Linear:
                continue
            quantized = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute,
                compress_statistics=True, quant_type="nf4", quant_storage=compute, device="meta",
            )
            quantized.weight, quantized.bias = linear.weight, linear.bias
            quantized.weight.requires_grad_(False)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, quantized)


def _pack_4bit(model: torch.nn.Module, compute: torch.dtype) -> None:
    """Quantise each Linear4bit's weight: packed NF4 data (0.5 B a parameter, a plain parameter that FSDP2 shards
    on dim 0) and its quantisation constants (`module.quant_state`, replicated on every rank)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import quantize_4bit

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            packed, module.quant_state = quantize_4bit(
                module.weight.detach().to(compute), blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=compute
            )
            module.weight = torch.nn.Parameter(packed, requires_grad=False)
            # Linear4bit reads the constants from its weight, which FSDP2 replaces by the gathered copy before
            # each forward; bitsandbytes' own repair (wrapping that copy in a Params4bit) cannot wrap fake tensors.
            module.register_forward_pre_hook(_attach_quant_state)


def _attach_quant_state(module: torch.nn.Module, args: tuple) -> None:
    module.weight.quant_state = module.quant_state


def _quant_constants(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every 4-bit layer's quantisation constants (absmax, codebooks, offsets), whole on every rank."""
    found = []
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        while state is not None:
            found += [t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)]
            state = state.state2 if state.nested else None
    return found


def _build_dynamic_map() -> None:
    """Double quantisation builds bitsandbytes' dynamic 8-bit map on first use with data-dependent ops, which
    fake tensors cannot run: build it (cached by bitsandbytes) on a real tensor, outside fake mode."""
    from bitsandbytes.functional import quantize_blockwise

    quantize_blockwise(torch.zeros(256))


CAUSAL_ONLY = "ftl_causal_only"


def _register_causal_only_attention() -> None:
    """FTL trains on packed, unpadded sequences, where HF's sdpa path passes no mask and sets
    `is_causal` (flash-style kernels, O(S) memory). Under fake tensors HF cannot read position_ids to
    see that, and would build an S x S mask that the real run never has. Registering a causal-only
    attention through HF's public Attention(Mask)Interface keeps the traced step equal to the real one."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CAUSAL_ONLY, sdpa_attention_forward)
    AttentionMaskInterface.register(CAUSAL_ONLY, lambda *args, **kwargs: None)


def _trace(setup: StepSetup, mesh, model: torch.nn.Module) -> MeasuredMemory:
    bf16 = setup.precision == "bf16"
    if setup.strategy == "ddp":
        wrapped = model
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # FTL's DDP runs autocast whatever the method
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        reshard = setup.strategy == "fsdp2"
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        wrapped = fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        autocast = contextlib.nullcontext()
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    # foreach=False: the foreach kernels' temporaries overstate the peak about 2x under fake tensors.
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)
    batch = torch.randint(0, setup.config.vocab_size, (setup.micro_batch_size, setup.seq_len))
    labels = torch.randint(0, setup.num_labels, (setup.micro_batch_size,)) if setup.num_labels else batch

    def step() -> None:
        with autocast:
            loss = wrapped(input_ids=batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=setup.strategy != "ddp")  # as the FTL strategies do

    # The first step runs untracked. Under fake tensors, DTensor's sharding propagation builds global-shape
    # fake arguments under our FakeTensorMode the first time it meets each op, and the tracker counts them
    # as optimizer memory (Llama-3-8B, FSDP2 over 8 ranks, seq 1024: +6.1 GiB in the first optimizer step;
    # a real 2-rank run has none of it). Every later step is what a run repeats.
    for _ in range(setup.steps - 1):
        step()
    # Tensors no tracker finds on its own: the batch, and 4-bit quantisation constants (not parameters).
    external = (batch, labels, *_quant_constants(wrapped))
    if setup.strategy == "ddp" and any(not p.requires_grad for p in wrapped.parameters()):  # MemTracker hooks every parameter's gradient
        states = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        grads = [p.grad for p in trainable if p.grad is not None]
        tracker = StoragePeak(*wrapped.parameters(), *wrapped.buffers(), *grads, *states, *external)
    elif setup.strategy == "ddp":
        tracker = MemTracker()
        tracker.track_external(wrapped, optimizer, *external)
    else:
        tracker = FSDPMemTracker(wrapped, optimizer)
        tracker.track_inputs(external)  # FSDPMemTracker files them under Inputs (reported as `other`)
    with tracker:
        step()
    trainable_state = _trainable_state_bytes(trainable, optimizer)
    if isinstance(tracker, StoragePeak):
        return MeasuredMemory(0, 0, 0, 0, 0, 0, peak=tracker.peak, trainable_state=trainable_state)
    by_kind = next(iter(tracker.get_tracker_snapshot("peak").values()))
    get = lambda *names: sum(by_kind.get(n, 0) for n in names)  # noqa: E731
    return MeasuredMemory(
        params=get("Parameter", "Sharded Param", "Unsharded Param", "Buffer"),
        grads=get("Gradient", "Sharded Grad", "Unsharded Grad"),
        optimizer=get("Optstate", "OptState"),
        activations=get("Activation"),
        temporaries=get("Temp", "All Gather", "Reduce Scatter"),
        other=get("Other", "Inputs"),
        peak=by_kind["Total"],
        trainable_state=trainable_state,
    )


def _trainable_state_bytes(trainable: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    """This rank's bytes of trainable parameters and their optimizer states (local shards for DTensors)."""

    def nbytes(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return local.numel() * local.element_size()

    states = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor) and t.ndim]
    return sum(nbytes(t) for t in [*trainable, *states])


def _with_lora(model: torch.nn.Module, setup: StepSetup) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    names = sorted({n.rsplit(".", 1)[-1] for n, m in transformer_blocks(model)[0].named_modules() if isinstance(m, torch.nn.Linear)})
    # (bitsandbytes' Linear4bit is a torch.nn.Linear subclass, so the 4-bit blocks are found the same way.)
    task = "SEQ_CLS" if setup.num_labels else None  # PEFT then trains the new head too, as FTL's classification does
    peft_model = get_peft_model(model, LoraConfig(
        r=setup.lora_rank, lora_alpha=2 * setup.lora_rank, lora_dropout=setup.lora_dropout, target_modules=names, task_type=task
    ))
    if setup.precision == "bf16":
        # The frozen base is stored in bf16 and the adapters stay fp32. Parameters are replaced one by
        # one (Module.to() cannot swap fake tensors in place), keeping tied ones tied.
        cast: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}  # id -> (original, kept alive; bf16)
        for module in peft_model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if not param.requires_grad:
                    if id(param) not in cast:
                        cast[id(param)] = (param, torch.nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False))
                    setattr(module, name, cast[id(param)][1])
    return peft_model


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)  # stray real constants (e.g. scalars) pass through


@contextlib.contextmanager
def _process_group(setup: StepSetup):
    if dist.is_initialized():
        raise RuntimeError("measure_step needs its own process group; call it outside a training job")
    if setup.fake:
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=setup.world_size)
    else:
        if setup.world_size != 1:
            raise ValueError("real measurement runs one rank in this process; use fake=True for larger worlds")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
