"""Per-rank memory of one training step, per strategy. Pure: frozen dataclasses in, bytes out.

Accounting follows how each strategy is implemented in FTL (see strategies/):
- DDP and FSDP2 keep fp32 parameters and use bf16 autocast / an FSDP2 MixedPrecisionPolicy
  (bf16 compute, fp32 reduce): 4 B param + 4 B grad + 8 B AdamW moments per trainable parameter.
- DeepSpeed ZeRO with bf16 keeps bf16 params and grads and an fp32 master copy with the optimizer:
  2 + 2 + 12 B (Rajbhandari et al., "ZeRO", 2020, K=12).
Both total 16 B per trainable parameter; the split decides what sharding removes. Frozen parameters
need no gradient or optimizer state: 2 B in bf16, 4 B in fp32.

Activations are counted per transformer block per token, from the tensors the HF Llama block saves
for backward (see `activation_bytes`); logits follow the issue's rule b*s*vocab*4 (fp32 upcast for the
loss). A fixed overhead covers the CUDA context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from launcher.model_info import ModelShape

GiB = 1024**3
MiB = 1024**2
# CUDA context (~0.5 GiB), NCCL communicators and the caching allocator's fragmentation.
OVERHEAD_CUDA_BYTES = 3 * GiB // 2
# Interpreter, libraries and the gloo communicator of one CPU rank.
OVERHEAD_CPU_BYTES = 256 * MiB
# Unsharded blocks an FSDP/ZeRO-3 rank holds at once: the current one and the prefetched next one.
GATHERED_BLOCKS = 2


@dataclass(frozen=True)
class MemoryInputs:
    """Everything per-rank memory depends on, apart from the strategy and the sharding group."""

    shape: ModelShape
    params_trainable: int
    frozen_bytes_per_param: float  # 2 (bf16), 4 (fp32) or ~0.56 (NF4 + quantisation constants)
    precision: str  # "bf16" or "fp32"
    device: str  # "cuda" or "cpu"
    micro_batch_size: int
    seq_len: int
    activation_checkpointing: bool

    @property
    def params_frozen(self) -> int:
        return self.shape.params_total - self.params_trainable

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes held by one rank at its peak, by kind; `host` is CPU memory per rank for offloaded states."""

    params: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    host: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.logits + self.overhead

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict[str, int]:
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "logits": self.logits,
            "overhead": self.overhead,
            "total": self.total,
            "host": self.host,
        }


def bytes_per_trainable_param(strategy: str, precision: str) -> tuple[int, int, int]:
    """(param, grad, optimizer) bytes of one trainable parameter, before sharding."""
    if strategy.startswith("zero") and precision == "bf16":
        return 2, 2, 12
    return 4, 4, 8


def activation_bytes(inputs: MemoryInputs) -> int:
    """Activations saved for backward across all blocks, for one micro-batch.

    Per token, one Llama-style block saves about 9h + 3h_kv + 4i elements: the two RMSNorm inputs and
    outputs (4h), q/k/v projections and their rotated copies (2h + 3h_kv), the attention output and
    the o_proj input (3h), and the MLP's gate, up, activation and product (4i). With activation
    checkpointing only each block's input (h) is kept, plus one block's full set while it is recomputed.
    """
    s = inputs.shape
    tokens = inputs.micro_batch_size * inputs.seq_len
    per_block = tokens * (9 * s.hidden_size + 3 * _kv_dim(s) + 4 * s.intermediate_size) * inputs.act_bytes
    if inputs.activation_checkpointing:
        kept = s.num_layers * tokens * s.hidden_size * inputs.act_bytes
        return kept + per_block
    return s.num_layers * per_block


def logits_bytes(inputs: MemoryInputs) -> int:
    return inputs.micro_batch_size * inputs.seq_len * inputs.shape.vocab_size * 4


def per_rank_memory(strategy: str, inputs: MemoryInputs, shard: int) -> MemoryBreakdown:
    """Peak bytes on one rank for `strategy`, with model states sharded over `shard` ranks."""
    p_b, g_b, o_b = bytes_per_trainable_param(strategy, inputs.precision)
    trainable, frozen = inputs.params_trainable, inputs.params_frozen
    frozen_bytes = int(frozen * inputs.frozen_bytes_per_param)
    params = trainable * p_b + frozen_bytes
    grads = trainable * g_b
    optimizer = trainable * o_b
    host = 0
    if strategy == "zero1":
        optimizer //= shard
    elif strategy == "zero2":
        optimizer //= shard
        grads //= shard
    elif strategy in ("fsdp2", "zero3"):
        params, grads, optimizer = params // shard, grads // shard, optimizer // shard
        params += _gathered_bytes(inputs)
    elif strategy in ("fsdp2_offload", "zero3_offload"):
        host = (params + grads + optimizer) // shard
        params, grads, optimizer = _gathered_bytes(inputs), 0, 0
    elif strategy != "ddp":
        raise ValueError(f"unknown strategy {strategy!r}")
    overhead = OVERHEAD_CUDA_BYTES if inputs.device == "cuda" else OVERHEAD_CPU_BYTES
    return MemoryBreakdown(
        params=params,
        grads=grads,
        optimizer=optimizer,
        activations=activation_bytes(inputs),
        logits=logits_bytes(inputs),
        overhead=overhead,
        host=host,
    )


def _gathered_bytes(inputs: MemoryInputs) -> int:
    """Unsharded working copies of the blocks being computed (compute dtype), plus the embedding/head
    which is gathered with the root."""
    block = inputs.shape.params_largest_block * inputs.act_bytes
    return GATHERED_BLOCKS * block + inputs.shape.params_embedding * inputs.act_bytes


def _kv_dim(shape: ModelShape) -> int:
    return shape.hidden_size * shape.num_kv_heads // shape.num_heads


def with_changes(inputs: MemoryInputs, **changes: object) -> MemoryInputs:
    return replace(inputs, **changes)
