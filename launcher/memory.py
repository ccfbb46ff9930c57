"""Per-rank peak memory of a training step, per strategy. Pure: frozen dataclasses in, bytes out.

Model states follow how each strategy is implemented in FTL (see strategies/):
- DDP and FSDP2 keep trainable parameters in fp32 (DDP computes under bf16 autocast, FSDP2 all-gathers
  bf16 copies through its MixedPrecisionPolicy): 4 B param + 4 B grad + 8 B AdamW moments.
- DeepSpeed ZeRO with bf16 keeps bf16 params and grads, an fp32 master copy with the optimizer
  (2 + 2 + 12 B; Rajbhandari et al., "ZeRO", 2020, K=12) and, for the step, an fp32 copy of its gradient
  partition (4 B): DeepSpeed's own estimators count 2 + 18/N B per parameter for ZeRO-2 and 18/N for ZeRO-3.
- Frozen parameters are stored in the compute dtype (2 B in bf16, 4 B in fp32). QLoRA's block Linears are
  NF4: 0.5 B of packed data a parameter, which FSDP2 shards, and 0.127 bits of quantisation constants
  (Dettmers et al., QLoRA 2023; bitsandbytes' absmax and codebooks), which every rank holds whole.

The peak is the largest of the moments of a step (each seen with launcher/measure.py's FSDPMemTracker;
bench/plan_accuracy.py checks the result on 35 cells up to 70B):
- the loss (start of backward): resident and gathered params, persistent grads (DDP and DeepSpeed keep
  them; FSDP2 frees them with zero_grad), optimizer states, every saved activation, the fp32 logits and
  the two logits-sized fp32 temporaries of the cross-entropy backward;
- a block's forward or backward (FSDP2): three blocks' worth gathered in forward; in backward the block's
  unsharded gradients, their fp32 reduce-scatter input and the head's unsharded gradient;
- the end of backward (FSDP2): every block's sharded gradient, plus the root's (embedding, head) unsharded
  gradients in the compute dtype and the fp32 reduce-scatter input they are copied into;
- the optimizer step: params, all grads, optimizer states and the step's temporaries.
Activation bytes per token per block are calibrated against HF Llama blocks traced by launcher/measure.py
(see ACTIVATION_COEFFS). A fixed overhead covers the CUDA context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.model_info import ModelShape

GiB = 1024**3
MiB = 1024**2
# CUDA context (~0.5 GiB), NCCL communicators and the caching allocator's fragmentation.
OVERHEAD_CUDA_BYTES = 3 * GiB // 2
# Interpreter, libraries and the gloo communicator of one CPU rank.
OVERHEAD_CPU_BYTES = 256 * MiB
# Unsharded blocks an FSDP/ZeRO-3 rank holds at once: the current one and the prefetched next one.
GATHERED_BLOCKS = 2
# NF4 (bitsandbytes, double quantisation): 4 bits of packed data a parameter, and constants of 0.127 bits:
# one 8-bit absmax per 64 parameters plus one fp32 absmax per 256 of those (Dettmers et al., QLoRA 2023).
NF4_DATA_BYTES_PER_PARAM = 0.5
NF4_CONSTANT_BYTES_PER_PARAM = 0.127 / 8
# Bytes of the fp32 copy of its gradient partition that DeepSpeed's bf16 ZeRO optimizer makes for the step
# (the "4_grads_32bit" of deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs).
ZERO_FP32_GRAD_BYTES = 4

# Bytes saved for backward per token in one Llama-style block: a*h + b*h_kv + c*i + d*(2 + heads), from
# HF blocks traced by launcher/measure.py (per-block difference of 4- and 2-layer models, six shapes):
# - fp32: 8h + 2h_kv + 4i elements of 4 B (norm inputs/outputs, q/k/v/rotated q,k, attention output,
#   gate/up/act/product), plus the fp32 rsqrt of both norms and the attention log-sum-exp per head;
# - bf16 parameters (FSDP2 mixed precision, ZeRO bf16): the same tensors in bf16, except the norms,
#   which HF computes in fp32: 20 B per h (exact on all six shapes);
# - fp32 parameters under bf16 autocast (DDP): the residual stream and norms stay fp32: 30 B per h.
# - LoRA (PEFT) over a frozen base: frozen Linears save no input for a weight gradient; each adapter keeps
#   its input and rank-r intermediate (added in activation_bytes, r x the adapter dtype per adapted Linear):
#   - FSDP2 bf16 (adapters cast to bf16 too): the adapters' inputs are the tensors the block saves anyway:
#     fp32 norm inputs 8h, bf16 norm outputs 4h, rotated q 2h, attention output 2h, k and v, the four
#     MLP tensors: 16h + 4h_kv + 8i (exact on all six shapes);
#   - DDP bf16 autocast (fp32 adapters over a bf16 base): PEFT casts each adapter's input to fp32 and
#     autocast back to bf16, a copy per adapter: ~27h + 4h_kv + 9i (least squares over the six shapes);
#   - fp32: 24h + 8h_kv + 16i.
ACTIVATION_COEFFS = {
    "fp32": (32, 8, 16, 4),
    "bf16_params": (20, 4, 8, 4),
    "bf16_autocast": (30, 4, 9, 4),
    "fp32_lora": (24, 8, 16, 4),
    "bf16_lora": (16, 4, 8, 4),
    "bf16_autocast_lora": (27, 4, 9, 4),
}
# LoRA dropout > 0 (FTL's default is 0.05): each adapter's input goes through its own dropout, whose output
# and mask are saved too: bytes per token per block of (h, i), exact on the same six traced shapes.
DROPOUT_COEFFS = {"fp32_lora": (40, 4), "bf16_lora": (20, 2), "bf16_autocast_lora": (24, 4)}
# Bytes per token per block kept with activation checkpointing (the block input on the residual stream,
# fp32 only where the embedding output is fp32: fp32 runs and DDP's autocast over fp32 weights).
CHECKPOINT_COEFF = {"fp32": 4, "bf16_params": 2, "bf16_autocast": 4, "fp32_lora": 4, "bf16_lora": 2, "bf16_autocast_lora": 2}
FSDP2_FAMILY = ("fsdp2", "fsdp2_gradop", "fsdp2_offload")


@dataclass(frozen=True)
class MemoryInputs:
    """Everything per-rank memory depends on, apart from the strategy and the sharding group."""

    shape: ModelShape
    params_trainable: int
    # Bytes per frozen parameter: 2 (bf16) or 4 (fp32); with `quantized`, the average over the whole base
    # (planner.qlora_frozen_bytes_per_param), which memory.py splits into packed data, constants and the rest.
    frozen_bytes_per_param: float
    precision: str  # "bf16" or "fp32"
    device: str  # "cuda" or "cpu"
    micro_batch_size: int
    seq_len: int
    activation_checkpointing: bool
    lora_rank: int = 0  # > 0: LoRA adapters (fp32) on every block Linear over a frozen base
    lora_dropout: float = 0.0  # on the adapters' inputs (`method.lora.dropout`)
    num_labels: int = 0  # > 0: sequence classification (a num_labels-output head), 0: causal LM over the vocabulary
    quantized: bool = False  # QLoRA: the frozen base's block Linears are NF4

    @property
    def params_frozen(self) -> int:
        return self.shape.params_total - self.params_trainable

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len

    @property
    def compute_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


@dataclass(frozen=True)
class MomentBytes:
    """What one rank holds at one moment of the step, by kind; the parts add up to the moment's bytes."""

    params: int = 0  # resident parameters plus the gathered (unsharded) copies alive at that moment
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    logits: int = 0
    temporaries: int = 0  # loss-backward buffers, unsharded grads and reduce-scatter inputs, step scratch

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.logits + self.temporaries


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes one rank holds, by kind. `total` is the peak: the largest of the step's moments (see module
    doc), plus overhead. `host` is CPU memory for offloaded states."""

    params: int  # resident parameters plus gathered (unsharded) working copies
    grads: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    temporaries: int = 0  # at the peak moment: loss-backward buffers, reduce-scatter buffers or step scratch
    host: int = 0
    backward_peak: int = 0  # the moments, without overhead
    step_peak: int = 0
    backward_end_peak: int = 0
    at_peak: MomentBytes = MomentBytes()  # the peak moment's parts: with overhead, they add up to `total`

    @property
    def total(self) -> int:
        return max(self.backward_peak, self.backward_end_peak, self.step_peak) + self.overhead

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def peak_moment(self) -> str:
        moments = {"backward": self.backward_peak, "end of backward": self.backward_end_peak, "optimizer step": self.step_peak}
        return max(moments, key=moments.__getitem__)

    def as_dict(self) -> dict[str, int | str]:
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "logits": self.logits,
            "temporaries": self.temporaries,
            "overhead": self.overhead,
            "total": self.total,
            "host": self.host,
            "peak_moment": self.peak_moment,
        }


def bytes_per_trainable_param(strategy: str, precision: str) -> tuple[int, int, int]:
    """(param, grad, optimizer) bytes of one trainable parameter, before sharding."""
    if strategy.startswith("zero") and precision == "bf16":
        return 2, 2, 12
    return 4, 4, 8


def activation_regime(strategy: str, precision: str, lora: bool = False) -> str:
    if precision != "bf16":
        return "fp32_lora" if lora else "fp32"
    if strategy == "ddp":  # fp32 trainable weights under autocast; a LoRA base is stored in bf16
        return "bf16_autocast_lora" if lora else "bf16_autocast"
    return "bf16_lora" if lora else "bf16_params"


def block_activation_bytes(inputs: MemoryInputs, regime: str) -> int:
    """Activations one block saves for backward, for one micro-batch (with checkpointing: while it is recomputed)."""
    s = inputs.shape
    a, b, c, d = ACTIVATION_COEFFS[regime]
    per_block = inputs.tokens * (a * s.hidden_size + b * _kv_dim(s) + c * s.intermediate_size + d * (2 + s.num_heads))
    if inputs.lora_rank:  # each adapter's rank-r intermediate, in the adapter's compute dtype
        adapter_bytes = 2 if regime.startswith("bf16") else 4
        per_block += inputs.tokens * adapter_bytes * inputs.lora_rank * s.block_linear_count
        if inputs.lora_dropout > 0:
            h_bytes, i_bytes = DROPOUT_COEFFS[regime]
            per_block += inputs.tokens * (h_bytes * s.hidden_size + i_bytes * s.intermediate_size)
    return per_block


def activation_bytes(inputs: MemoryInputs, regime: str, layers: int | None = None) -> int:
    """Activations saved for backward by `layers` blocks (default: all) at the end of their forward, plus the
    embedding output (with checkpointing, each block keeps only its input)."""
    s = inputs.shape
    block_input = inputs.tokens * s.hidden_size * CHECKPOINT_COEFF[regime]
    kept = block_input if inputs.activation_checkpointing else block_activation_bytes(inputs, regime)
    return (s.num_layers if layers is None else layers) * kept + block_input


def logits_bytes(inputs: MemoryInputs) -> int:
    """The fp32 logits HF's loss keeps (batch x seq x vocab x 4 B); a classifier's are num_labels wide."""
    width = inputs.num_labels or inputs.shape.vocab_size
    return inputs.tokens * width * 4


@dataclass(frozen=True)
class _States:
    """What a strategy keeps of the model, on this rank's device (host: offloaded)."""

    params: int  # the rank's own parameters (its shard, where the strategy shards)
    replicated: int  # held whole on every rank whatever the strategy (QLoRA's NF4 constants)
    grads: int
    grad_copy: int  # ZeRO with bf16: the fp32 copy of the gradient partition, made for the step
    optimizer: int
    gathered: int = 0  # unsharded working copies: the blocks being computed and the root
    block_gathered: int = 0  # one block's share of `gathered`
    host: int = 0

    @property
    def resident(self) -> int:
        return self.params + self.replicated + self.optimizer


def per_rank_memory(strategy: str, inputs: MemoryInputs, shard: int) -> MemoryBreakdown:
    """Peak bytes on one rank for `strategy`, with model states sharded over `shard` ranks."""
    st = _states(strategy, inputs, shard)
    fsdp2 = strategy in FSDP2_FAMILY
    grads_kept = 0 if fsdp2 else st.grads  # DDP and DeepSpeed keep gradient buffers; FSDP2's zero_grad frees them
    regime = activation_regime(strategy, inputs.precision, lora=inputs.lora_rank > 0)
    saved = activation_bytes(inputs, regime) + _autocast_weight_copies(inputs, regime)
    recomputed = block_activation_bytes(inputs, regime) if inputs.activation_checkpointing else 0
    logits = logits_bytes(inputs)
    loss_temp = 2 * logits  # softmax and grad of the logits, both fp32, at the start of backward

    # Start of backward (the loss): every saved activation, the root gathered and the next block arriving.
    params = st.params + st.replicated
    loss = MomentBytes(params + st.gathered - st.block_gathered, grads_kept, st.optimizer, saved, logits, loss_temp)
    # A block's forward: the root, the block's all-gather buffer and the parameters copied out of it, and the
    # next block's all-gather (Llama-2-7B LoRA, 8 ranks, seq 512 + AC: three 388 MiB blocks beside the root).
    forward = MomentBytes(params + st.gathered + st.block_gathered, grads_kept, st.optimizer, saved + recomputed)
    # A block's backward, the first (most activations alive) and one of the last (most gradients reduced):
    # its recomputed activations, the blocks gathered, and under FSDP2 its unsharded gradients with their fp32
    # reduce-scatter input (compute + 4 B a trainable parameter) and the head's unsharded gradient, alive from
    # the first backward op to the root's post-backward (Llama-2-7B, 8 ranks, seq 512: 3 GiB over the step).
    unsharded_grads = 0
    if fsdp2:
        unsharded_grads = _block_trainable(inputs) * (inputs.compute_bytes + 4) + _head_trainable(inputs) * inputs.compute_bytes
    first_block = MomentBytes(params + st.gathered, grads_kept, st.optimizer, saved + recomputed, temporaries=unsharded_grads)
    reduced = st.grads - st.grads // inputs.shape.num_layers if strategy in ("fsdp2", "fsdp2_gradop") else 0
    last_blocks = MomentBytes(
        params + st.gathered, grads_kept + reduced, st.optimizer, activation_bytes(inputs, regime, layers=2) + recomputed,
        temporaries=unsharded_grads,
    )
    backward = max(loss, forward, first_block, last_blocks, key=lambda m: m.total)

    backward_end = MomentBytes()
    if fsdp2:
        # The root's post-backward (Llama-3-8B, 8 ranks, seq 1024: 1.96 GiB of bf16 grads + 3.91 GiB of fp32
        # reduce-scatter input for embedding and head, on top of every block's sharded gradient: the peak).
        root = _root_trainable(inputs)
        backward_end = MomentBytes(params, max(0, st.grads - root * 4 // shard), st.optimizer, temporaries=root * (inputs.compute_bytes + 4))

    step_temp = _step_temp_bytes(inputs, shard if strategy not in ("ddp", "zero1") else 1) if st.grads else 0
    step = MomentBytes(params, st.grads + st.grad_copy, st.optimizer, temporaries=step_temp)
    # Ties go to the earliest moment, as `MemoryBreakdown.peak_moment` names it.
    at_peak = max(backward, backward_end, step, key=lambda m: m.total)
    return MemoryBreakdown(
        params=st.params + st.replicated + st.gathered,
        grads=st.grads + st.grad_copy,
        optimizer=st.optimizer,
        activations=saved + recomputed,
        logits=logits,
        overhead=OVERHEAD_CUDA_BYTES if inputs.device == "cuda" else OVERHEAD_CPU_BYTES,
        temporaries=at_peak.temporaries,
        host=st.host,
        backward_peak=backward.total,
        step_peak=step.total,
        backward_end_peak=backward_end.total,
        at_peak=at_peak,
    )


def _states(strategy: str, inputs: MemoryInputs, shard: int) -> _States:
    p_b, g_b, o_b = bytes_per_trainable_param(strategy, inputs.precision)
    trainable = inputs.params_trainable
    frozen_sharded, replicated = _frozen_bytes(inputs)
    params, grads, optimizer = trainable * p_b + frozen_sharded, trainable * g_b, trainable * o_b
    grad_copy = trainable * ZERO_FP32_GRAD_BYTES if g_b == 2 else 0
    if strategy == "ddp":
        return _States(params, replicated, grads, grad_copy, optimizer)
    if strategy == "zero1":
        return _States(params, replicated, grads, grad_copy // shard, optimizer // shard)
    if strategy == "zero2":
        return _States(params, replicated, grads // shard, grad_copy // shard, optimizer // shard)
    # fsdp2_gradop is FSDP2 with reshard_after_forward=False (ZeRO-2-like, FSDP1's SHARD_GRAD_OP): every
    # block's unsharded parameters stay gathered from its forward to its backward.
    blocks = inputs.shape.num_layers if strategy == "fsdp2_gradop" else GATHERED_BLOCKS
    gathered = _gathered_bytes(inputs, strategy, blocks)
    block = _gathered_bytes(inputs, strategy, 1, root=False)
    if strategy in ("fsdp2", "fsdp2_gradop", "zero3"):
        return _States(params // shard, replicated, grads // shard, grad_copy // shard, optimizer // shard, gathered, block)
    if strategy in ("fsdp2_offload", "zero3_offload"):
        host = (params + grads + optimizer + grad_copy) // shard
        return _States(0, replicated, 0, 0, 0, gathered, block, host)
    raise ValueError(f"unknown strategy {strategy!r}")


def _autocast_weight_copies(inputs: MemoryInputs, regime: str) -> int:
    """Autocast casts each fp32 weight to bf16 for its matmul, and backward keeps that copy for the input
    gradient: 2 B per Linear weight (125M-parameter classifier under DDP: 0.16 GiB of its 2.3 GiB peak)."""
    if regime != "bf16_autocast":
        return 0
    s = inputs.shape
    return 2 * (s.block_linear_params * s.num_layers + s.hidden_size * (inputs.num_labels or s.vocab_size))


def _frozen_bytes(inputs: MemoryInputs) -> tuple[int, int]:
    """(bytes a strategy shards, bytes every rank holds whole) of the frozen parameters."""
    if not inputs.quantized:
        return int(inputs.params_frozen * inputs.frozen_bytes_per_param), 0
    quantized = _quantized_params(inputs.shape)
    dense = max(0, inputs.params_frozen - quantized)  # embeddings, norms, head: compute dtype
    packed = int(quantized * NF4_DATA_BYTES_PER_PARAM)
    return packed + dense * inputs.compute_bytes, int(quantized * NF4_CONSTANT_BYTES_PER_PARAM)


def _gathered_bytes(inputs: MemoryInputs, strategy: str, blocks: int = GATHERED_BLOCKS, root: bool = True) -> int:
    """Unsharded working copies in the compute dtype: the blocks being computed (QLoRA: packed 4-bit, plus the
    one Linear bitsandbytes dequantises for backward) and the root (embedding, head), which stays gathered from
    forward to backward. The unsharded copy is a new allocation beside the rank's shard (FSDPMemTracker: the
    root's 'Unsharded Param' is its full size at every world size)."""
    s = inputs.shape
    compute = inputs.compute_bytes
    adapters = inputs.lora_rank * s.block_linear_dims
    block = (s.params_largest_block + adapters) * compute
    dequantized = 0
    if inputs.quantized:
        dense = s.params_largest_block - s.block_linear_params + adapters
        block = int(s.block_linear_params * NF4_DATA_BYTES_PER_PARAM) + dense * compute
        dequantized = s.intermediate_size * s.hidden_size * compute  # one MLP weight at a time
    unsharded = blocks * block + dequantized + s.params_embedding * compute * root
    if strategy.startswith("zero3") and root:
        # DeepSpeed's estimators charge 4 B per parameter of the largest layer for ZeRO-3's gathered working
        # set (estimate_zero3_model_states_mem_needs); never plan below them.
        return max(unsharded, 4 * s.params_largest_tensor)
    return unsharded


def _root_trainable(inputs: MemoryInputs) -> int:
    """Trainable parameters of the root FSDP group (embedding, head, final norm): the LM head and embedding
    when the body trains (full fine-tuning, freezing), a new classification head under adapters."""
    if inputs.lora_rank:
        return inputs.shape.hidden_size * inputs.num_labels
    return min(inputs.params_trainable, inputs.shape.params_embedding)


def _block_trainable(inputs: MemoryInputs) -> int:
    """Trainable parameters of one block: its adapters, or all of it."""
    if inputs.lora_rank:
        return inputs.lora_rank * inputs.shape.block_linear_dims
    return min(inputs.params_trainable, inputs.shape.params_largest_block)


def _head_trainable(inputs: MemoryInputs) -> int:
    """Trainable parameters of the output head (LM head, tied or not, or a new classification head)."""
    width = inputs.num_labels or inputs.shape.vocab_size
    return inputs.shape.hidden_size * width if _root_trainable(inputs) else 0


def _quantized_params(shape: ModelShape) -> int:
    return shape.block_linear_params * shape.num_layers


def _step_temp_bytes(inputs: MemoryInputs, shard: int) -> int:
    """Scratch of a per-tensor (fused or single-tensor) AdamW step: two fp32 buffers the size of the
    largest parameter shard (measured: 2x the embedding for a Llama)."""
    largest = inputs.shape.params_largest_tensor
    if inputs.lora_rank:  # only adapters (and a classification head) train
        largest = max(inputs.lora_rank * inputs.shape.intermediate_size, inputs.shape.hidden_size * inputs.num_labels)
    return 2 * 4 * largest // shard


def _kv_dim(shape: ModelShape) -> int:
    return shape.hidden_size * shape.num_kv_heads // shape.num_heads
