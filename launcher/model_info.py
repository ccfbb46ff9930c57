"""What the planner needs to know about a model, read from its config on the meta device: no weights.

This is the only planner input that touches torch; the result is a frozen `ModelShape` so that
`launcher.memory` and `launcher.planner` stay pure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from launcher.errors import FTLError

if TYPE_CHECKING:  # torch and transformers take seconds to import: only the functions that build a config need them
    import torch
    from transformers import PretrainedConfig

    from launcher.spec import ModelSpec


@dataclass(frozen=True)
class ModelShape:
    """Sizes that drive memory: counts are exact (from the meta-device model), dims come from the config."""

    params_total: int
    params_embedding: int  # input embedding (+ output head when untied)
    params_largest_block: int  # the biggest repeated transformer block: the unit FSDP/ZeRO-3 gathers
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    linear_names: tuple[str, ...] = ()  # leaf names of the Linear layers inside a block (q_proj, ...)
    block_linear_params: int = 0  # weights of the Linear layers in one block (what 4-bit quantises)
    block_linear_dims: int = 0  # sum of in+out features over those layers (LoRA adds r * this per block)
    block_linear_count: int = 0
    params_largest_tensor: int = 0  # the biggest single parameter (usually the embedding or the head)
    params_lm_head: int = 0  # the output head when it is not tied to the input embedding (part of params_embedding)

    def with_classification_head(self, num_labels: int) -> "ModelShape":
        """The same body with a new `num_labels`-output head in place of the LM head, as HF's
        *ForSequenceClassification builds it (a tied head leaves the embedding, which stays)."""
        head = self.hidden_size * num_labels
        return replace(
            self,
            params_total=self.params_total - self.params_lm_head + head,
            params_embedding=self.params_embedding - self.params_lm_head + head,
            params_lm_head=0,
        )


def build_config(spec: ModelSpec) -> PretrainedConfig:
    """The HF config of the job's model, from the inline `model.config` or the local folder."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    try:
        from huggingface_hub.errors import StrictDataclassError  # transformers 5's config validation
    except ImportError:  # older huggingface_hub (transformers 4.x): nothing raises it

        class StrictDataclassError(Exception):
            pass

    from launcher.model_checks import check_config, check_given_values, construction_error

    where = "model.config" if spec.config is not None else f"{spec.name_or_path}/config.json"
    try:
        if spec.config is not None:
            given = dict(spec.config)
            check_given_values(given, where)
            config = AutoConfig.for_model(given.pop("model_type"), **given)
        else:
            config = AutoConfig.from_pretrained(spec.name_or_path, local_files_only=True)
            given = json.loads((Path(spec.name_or_path) / "config.json").read_text())
    except StrictDataclassError as exc:  # transformers 5 validates fields and their relations
        raise construction_error(exc, where) from None
    except (ValueError, KeyError, TypeError, OSError) as exc:
        where = "`model.config`" if spec.config is not None else f"`model.name_or_path` ({spec.name_or_path})"
        raise FTLError(f"Cannot build the model config from {where}: {exc}. Check model_type and field names.") from None
    check_config(config, given, where)
    return config


def model_shape(spec: ModelSpec) -> ModelShape:
    return _shape_of(build_config(spec))


def _shape_of(config: PretrainedConfig) -> ModelShape:
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.quiet import quiet_libraries

    # quiet: an encoder body sized as a causal LM (BERT) makes transformers say "add `is_decoder=True`".
    with torch.device("meta"), quiet_libraries():
        model = AutoModelForCausalLM.from_config(config)
    params_total = sum(p.numel() for p in model.parameters())
    blocks = transformer_blocks(model)
    largest = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    untied_head = head.weight.numel() if head is not None and head.weight is not model.get_input_embeddings().weight else 0
    linears = {name: mod for name, mod in largest.named_modules() if isinstance(mod, torch.nn.Linear)}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    heads = _first(text, "num_attention_heads", "n_head")
    return ModelShape(
        params_total=params_total,
        params_embedding=embedding + untied_head,
        params_largest_block=sum(p.numel() for p in largest.parameters()),
        num_layers=len(blocks),
        hidden_size=hidden,
        intermediate_size=_first(text, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden,
        num_heads=heads,
        num_kv_heads=_first(text, "num_key_value_heads", default=heads) or heads,
        vocab_size=text.vocab_size,
        linear_names=tuple(sorted({name.rsplit(".", 1)[-1] for name in linears})),
        block_linear_params=sum(m.weight.numel() for m in linears.values()),
        block_linear_dims=sum(m.in_features + m.out_features for m in linears.values()),
        block_linear_count=len(linears),
        params_largest_tensor=max(p.numel() for p in model.parameters()),
        params_lm_head=untied_head,
    )


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformer: the longest ModuleList whose items share one class.

    Found structurally rather than by family name (model.layers, transformer.h, encoder.layer, ...) so
    new architectures work without a table.
    """
    import torch

    best: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            if len({type(m) for m in module}) == 1:
                best = list(module)
    if not best:
        raise FTLError(f"Cannot find the repeated transformer blocks of {type(model).__name__}; FTL supports transformer models.")
    return best


def _first(config: PretrainedConfig, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    if default is None:
        raise FTLError(f"The model config has none of {names}; FTL cannot size this architecture.")
    return default
