"""Per-rank peak memory of a training step, per strategy. Pure: frozen dataclasses in, bytes out.

Model states follow how each strategy is implemented in FTL (see strategies/):
- DDP and FSDP2 keep fp32 parameters (DDP computes under bf16 autocast, FSDP2 all-gathers bf16 copies
  through its MixedPrecisionPolicy): 4 B param + 4 B grad + 8 B AdamW moments per trainable parameter.
- DeepSpeed ZeRO with bf16 keeps bf16 params and grads and an fp32 master copy with the optimizer:
  2 + 2 + 12 B (Rajbhandari et al., "ZeRO", 2020, K=12).
Frozen parameters need no gradient or optimizer state: 2 B in bf16, 4 B in fp32, ~0.52 B in NF4.

The peak is the larger of two moments of a step (both seen with launcher/measure.py):
- start of backward: resident and gathered params, persistent grads (DDP keeps them; FSDP2 frees them
  with zero_grad), optimizer states, every saved activation, the fp32 logits and the two logits-sized
  fp32 temporaries of the cross-entropy backward;
- optimizer step: params, all grads, optimizer states and the step's temporaries.
Activation bytes per token per block are calibrated against HF Llama blocks traced by
launcher/measure.py (see ACTIVATION_COEFFS); bench/plan_accuracy.py checks the result end to end.
A fixed overhead covers the CUDA context, NCCL buffers and allocator fragmentation.
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

# Bytes saved for backward per token in one Llama-style block: a*h + b*h_kv + c*i + d*(2 + heads),
# measured by tracing HF blocks (launcher/measure.py; see tests/launcher/test_memory_calibration.py):
# - fp32: 8h + 2h_kv + 4i elements of 4 B (norm inputs/outputs, q/k/v/rotated q,k, attention output,
#   gate/up/act/product), plus the fp32 rsqrt of both norms and the attention log-sum-exp per head;
# - bf16 parameters (FSDP2 mixed precision, ZeRO bf16): the same tensors in bf16, except the norms,
#   which HF computes in fp32: 20 B per h;
# - fp32 parameters under bf16 autocast (DDP): the residual stream and norms stay fp32: 30 B per h.
# - LoRA (PEFT) over a frozen base: frozen Linears save no input for a weight gradient, but each adapter
#   keeps its (fp32-cast) input and rank-r intermediate: fp32 24h + 8h_kv + 16i, bf16 base 36h + 4h_kv + 10i,
#   plus 4 B x r per adapted Linear (added in activation_bytes).
ACTIVATION_COEFFS = {
    "fp32": (32, 8, 16, 4),
    "bf16_params": (20, 4, 8, 4),
    "bf16_autocast": (30, 4, 9, 4),
    "fp32_lora": (24, 8, 16, 4),
    "bf16_lora": (36, 4, 10, 4),
}
# Bytes per token per block kept with activation checkpointing (the block input on the residual stream).
CHECKPOINT_COEFF = {"fp32": 4, "bf16_params": 2, "bf16_autocast": 4, "fp32_lora": 4, "bf16_lora": 2}


@dataclass(frozen=True)
class MemoryInputs:
    """Everything per-rank memory depends on, apart from the strategy and the sharding group."""

    shape: ModelShape
    params_trainable: int
    frozen_bytes_per_param: float  # 2 (bf16), 4 (fp32) or ~0.52 (NF4 + quantisation constants)
    precision: str  # "bf16" or "fp32"
    device: str  # "cuda" or "cpu"
    micro_batch_size: int
    seq_len: int
    activation_checkpointing: bool
    lora_rank: int = 0  # > 0: LoRA adapters (fp32) on every block Linear over a frozen base

    @property
    def params_frozen(self) -> int:
        return self.shape.params_total - self.params_trainable

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes one rank holds, by kind. `total` is the peak: the larger of the backward-start and the
    optimizer-step moments (see module doc), plus overhead. `host` is CPU memory for offloaded states."""

    params: int  # resident parameters plus gathered (unsharded) working copies
    grads: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    temporaries: int = 0  # at the peak moment: loss-backward buffers or optimizer-step scratch
    host: int = 0
    backward_peak: int = 0  # the two moments, without overhead
    step_peak: int = 0

    @property
    def total(self) -> int:
        return max(self.backward_peak, self.step_peak) + self.overhead

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def peak_moment(self) -> str:
        return "backward" if self.backward_peak >= self.step_peak else "optimizer step"

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
    if lora:  # the frozen base is stored in the compute dtype under every strategy
        return "bf16_lora" if precision == "bf16" else "fp32_lora"
    if precision != "bf16":
        return "fp32"
    return "bf16_autocast" if strategy == "ddp" else "bf16_params"  # DDP keeps fp32 weights + autocast


def activation_bytes(inputs: MemoryInputs, regime: str) -> int:
    """Activations saved for backward across all blocks, for one micro-batch, plus the embedding output."""
    s = inputs.shape
    a, b, c, d = ACTIVATION_COEFFS[regime]
    per_block = inputs.tokens * (a * s.hidden_size + b * _kv_dim(s) + c * s.intermediate_size + d * (2 + s.num_heads))
    if inputs.lora_rank:
        per_block += inputs.tokens * 4 * inputs.lora_rank * s.block_linear_count
    embedding_out = inputs.tokens * s.hidden_size * CHECKPOINT_COEFF[regime]
    if inputs.activation_checkpointing:
        kept = s.num_layers * inputs.tokens * s.hidden_size * CHECKPOINT_COEFF[regime]
        return kept + per_block + embedding_out  # plus one block's full set while it is recomputed
    return s.num_layers * per_block + embedding_out


def logits_bytes(inputs: MemoryInputs) -> int:
    """The fp32 logits HF's loss keeps (batch x seq x vocab x 4 B)."""
    return inputs.tokens * inputs.shape.vocab_size * 4


def per_rank_memory(strategy: str, inputs: MemoryInputs, shard: int) -> MemoryBreakdown:
    """Peak bytes on one rank for `strategy`, with model states sharded over `shard` ranks."""
    p_b, g_b, o_b = bytes_per_trainable_param(strategy, inputs.precision)
    trainable = inputs.params_trainable
    params = trainable * p_b + int(inputs.params_frozen * inputs.frozen_bytes_per_param)
    grads = trainable * g_b
    optimizer = trainable * o_b
    gathered, host = 0, 0
    grads_kept = grads  # grads alive at backward start: DDP and DeepSpeed keep their buffers
    if strategy == "zero1":
        optimizer //= shard
    elif strategy == "zero2":
        optimizer //= shard
        grads //= shard
        grads_kept = grads
    elif strategy in ("fsdp2", "fsdp2_gradop", "zero3"):
        params, grads, optimizer = params // shard, grads // shard, optimizer // shard
        # fsdp2_gradop is FSDP2 with reshard_after_forward=False (ZeRO-2-like, FSDP1's SHARD_GRAD_OP):
        # every block's unsharded parameters stay gathered from its forward to its backward.
        blocks = inputs.shape.num_layers if strategy == "fsdp2_gradop" else GATHERED_BLOCKS
        gathered = _gathered_bytes(inputs, shard, blocks)
        grads_kept = grads if strategy == "zero3" else 0  # FSDP2 zero_grad frees the sharded grads
    elif strategy in ("fsdp2_offload", "zero3_offload"):
        host = (params + grads + optimizer) // shard
        params, grads, optimizer, grads_kept = 0, 0, 0, 0
        gathered = _gathered_bytes(inputs, shard)
    elif strategy != "ddp":
        raise ValueError(f"unknown strategy {strategy!r}")

    regime = activation_regime(strategy, inputs.precision, lora=inputs.lora_rank > 0)
    activations = activation_bytes(inputs, regime)
    logits = logits_bytes(inputs)
    loss_temp = 2 * logits  # softmax and grad of the logits, both fp32, at the start of backward
    step_temp = _step_temp_bytes(inputs, shard if strategy not in ("ddp", "zero1") else 1) if grads else 0
    backward_peak = params + gathered + grads_kept + optimizer + activations + logits + loss_temp
    step_peak = params + grads + optimizer + step_temp
    overhead = OVERHEAD_CUDA_BYTES if inputs.device == "cuda" else OVERHEAD_CPU_BYTES
    return MemoryBreakdown(
        params=params + gathered,
        grads=grads,
        optimizer=optimizer,
        activations=activations,
        logits=logits,
        overhead=overhead,
        temporaries=loss_temp if backward_peak >= step_peak else step_temp,
        host=host,
        backward_peak=backward_peak,
        step_peak=step_peak,
    )


def _gathered_bytes(inputs: MemoryInputs, shard: int, blocks: int = GATHERED_BLOCKS) -> int:
    """Unsharded working copies (compute dtype) of the blocks being computed and of the root (embedding,
    head), which FTL keeps gathered from forward to backward; minus this rank's own shard of them."""
    compute = 2 if inputs.precision == "bf16" else 4
    unsharded = blocks * inputs.shape.params_largest_block + inputs.shape.params_embedding
    return unsharded * compute * (shard - 1) // shard


def _step_temp_bytes(inputs: MemoryInputs, shard: int) -> int:
    """Scratch of a per-tensor (fused or single-tensor) AdamW step: two fp32 buffers the size of the
    largest parameter shard (measured: 2x the embedding for a Llama)."""
    return 2 * 4 * inputs.shape.params_largest_tensor // shard


def _kv_dim(shape: ModelShape) -> int:
    return shape.hidden_size * shape.num_kv_heads // shape.num_heads
