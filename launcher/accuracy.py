"""Predicted vs measured per-rank peak for one configuration: what bench/plan_accuracy.py tabulates and
tests/launcher/test_plan_accuracy.py asserts. Shared so the bench and the tests compare the same thing."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig

from launcher.measure import MeasuredMemory, StepSetup, measure_step
from launcher.memory import MemoryBreakdown, MemoryInputs, per_rank_memory
from launcher.model_info import model_shape
from launcher.planner import lora_params, qlora_frozen_bytes_per_param
from launcher.spec import LoraSpec, ModelSpec

LORA_RANK = 16
LORA_DROPOUT = LoraSpec().dropout  # FTL's default: the adapters' inputs go through dropout

# Llama-architecture sizes: tiny (tests), ~125M, Llama-3.2-1B, Llama-3-8B and Llama-3-70B, and the 7B-13B
# class of Llama-2 (its 32k vocabulary) and Mistral-7B (grouped-query attention, a wider MLP; its sliding
# window does not change memory at 4096 tokens or fewer, so a Llama block of its dimensions stands in).
MODELS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=384),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
}


@dataclass(frozen=True)
class Cell:
    model: str
    method: str  # "full" | "lora" | "qlora"
    strategy: str  # "ddp" | "fsdp2" | "fsdp2_gradop"
    world_size: int
    micro_batch_size: int
    seq_len: int
    precision: str = "bf16"
    activation_checkpointing: bool = False
    fake: bool = True
    num_labels: int = 0  # > 0: sequence classification (a new head), not a causal LM

    @property
    def label(self) -> str:
        ac = "+ac" if self.activation_checkpointing else ""
        task = f" cls{self.num_labels}" if self.num_labels else ""
        return f"{self.model} {self.method}{task} {self.strategy} w{self.world_size} {self.precision} b{self.micro_batch_size}x{self.seq_len}{ac}"


@dataclass(frozen=True)
class Comparison:
    cell: Cell
    predicted: MemoryBreakdown
    measured: MeasuredMemory

    @property
    def predicted_peak(self) -> int:
        """Tensor memory only: the fixed runtime overhead is not a tensor any tracker can see."""
        return self.predicted.total - self.predicted.overhead

    @property
    def ratio(self) -> float:
        return self.predicted_peak / self.measured.peak


def model_config(name: str) -> AutoConfig:
    fields = {"tie_word_embeddings": False, "max_position_embeddings": 8192, **MODELS[name]}
    return AutoConfig.for_model("llama", **fields)


def predict(cell: Cell) -> MemoryBreakdown:
    """The planner's memory model for the cell's step."""
    config = model_config(cell.model)
    shape = model_shape(ModelSpec(config={"model_type": "llama", **config.to_diff_dict()}))
    if cell.num_labels:
        shape = shape.with_classification_head(cell.num_labels)
    lora = cell.method in ("lora", "qlora")
    head = shape.hidden_size * cell.num_labels  # a new classification head trains with every method
    trainable = lora_params(shape, LORA_RANK) + head if lora else shape.params_total
    dense = 2 if cell.precision == "bf16" else 4
    frozen = qlora_frozen_bytes_per_param(shape, cell.precision) if cell.method == "qlora" else dense
    inputs = MemoryInputs(
        shape=shape,
        params_trainable=trainable,
        frozen_bytes_per_param=frozen,
        precision=cell.precision,
        device="cuda",
        micro_batch_size=cell.micro_batch_size,
        seq_len=cell.seq_len,
        activation_checkpointing=cell.activation_checkpointing,
        lora_rank=LORA_RANK if lora else 0,
        lora_dropout=LORA_DROPOUT if lora else 0.0,
        num_labels=cell.num_labels,
        quantized=cell.method == "qlora",
    )
    return per_rank_memory(cell.strategy, inputs, cell.world_size)


def compare(cell: Cell) -> Comparison:
    lora = cell.method in ("lora", "qlora")
    measured = measure_step(
        StepSetup(
            config=model_config(cell.model),
            strategy=cell.strategy,
            world_size=cell.world_size,
            micro_batch_size=cell.micro_batch_size,
            seq_len=cell.seq_len,
            precision=cell.precision,
            activation_checkpointing=cell.activation_checkpointing,
            lora_rank=LORA_RANK if lora else 0,
            lora_dropout=LORA_DROPOUT if lora else 0.0,
            quantized=cell.method == "qlora",
            num_labels=cell.num_labels,
            fake=cell.fake,
        )
    )
    return Comparison(cell, predict(cell), measured)
