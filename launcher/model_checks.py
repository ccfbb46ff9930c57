"""Checks on a model's config that turn transformers' tracebacks and silent defaults into one paragraph
naming the field: the architecture fields a config must give, their values, the architectures FTL does not
train, and `train.seq_len` against the model's positions. Pure: configs in, FTLError or warnings out."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from launcher.errors import FTLError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Without these, transformers fills in its own defaults for the model type: a config.json that lost
# `hidden_size` is planned (and trained) as another model, silently.
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
POSITIVE = (*REQUIRED, "intermediate_size", "num_key_value_heads", "max_position_embeddings")


def names_for(config_cls: type, field: str) -> set[str]:
    """The keys a config file may use for `field` (GPT-2 says `n_embd` for hidden_size)."""
    mapping = getattr(config_cls, "attribute_map", {}) or {}
    return {field} | {a for a, b in mapping.items() if b == field} | {b for a, b in mapping.items() if a == field}


ALIASES = ("n_embd", "n_layer", "n_head", "n_positions", "n_inner", "d_model", "num_layers", "num_heads")


def check_given_values(given: dict, where: str) -> None:
    """The size fields the user wrote are positive whole numbers (before transformers sees them: its own
    refusal of `num_attention_heads: -5` is about hidden_size)."""
    for key in (*POSITIVE, *ALIASES):
        value = given.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise FTLError(f"`{where}.{key}` is {value!r}; it must be a positive whole number.")


def construction_error(exc: BaseException, where: str) -> FTLError:
    """transformers' (and huggingface_hub's strict dataclass) refusal of a config, as one paragraph naming
    the field when the message names one."""
    cause = exc.__cause__ or exc
    text = f"{type(cause).__name__}: {cause}".replace("\n", " ")
    named = re.search(r"field '(\w+)'", str(exc))
    field = f"{where}.{named.group(1)}" if named else where
    return FTLError(f"`{field}` is refused by transformers ({text}). Fix the value in {where}.")


def check_config(config: PretrainedConfig, given: dict, where: str) -> None:
    """`given`: the keys the user wrote (inline `model.config`, or the folder's config.json); `where` names
    them in messages (`model.config` or `<folder>/config.json`)."""
    if getattr(config, "is_encoder_decoder", False):
        raise FTLError(
            f"{where}: `{config.model_type}` is an encoder-decoder model, which FTL does not train: its loop feeds one "
            "token stream to a decoder-only causal LM or to an encoder with a classification head, and an encoder-"
            "decoder needs separate encoder inputs and decoder labels. Use a decoder-only model (Llama, Qwen, GPT-2, ...) "
            "for generation or an encoder (BERT, MiniLM, ...) for classification."
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is config:  # a multimodal config's text part has its own nesting; its keys are not checked here
        missing = [f for f in REQUIRED if not names_for(type(config), f) & set(given)]
        if missing:
            raise FTLError(
                f"{where} does not give {', '.join(missing)}: transformers would fill in its `{config.model_type}` defaults "
                f"({', '.join(f'{f}={getattr(config, f, None)}' for f in missing)}) and FTL would plan and train another "
                f"model than the one you mean. Add {' and '.join(missing)} to {where}."
            )
    for field in POSITIVE:
        value = getattr(text, field, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            key = next(iter(sorted(names_for(type(config), field) & set(given))), field)
            raise FTLError(f"`{where}.{key}` is {value!r}; it must be a positive whole number.")
    heads, kv = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    hidden = getattr(text, "hidden_size", None)
    if heads and hidden and hidden % heads and not getattr(text, "head_dim", None):
        raise FTLError(f"`{where}.hidden_size` ({hidden}) is not a multiple of num_attention_heads ({heads}): each head gets hidden_size / heads dims.")
    if heads and kv and heads % kv:
        raise FTLError(f"`{where}.num_key_value_heads` ({kv}) does not divide num_attention_heads ({heads}): grouped-query attention shares each KV head among a whole number of heads.")


def rope_factor(config: PretrainedConfig) -> float | None:
    """The RoPE scaling factor (1.0 unscaled), or None for a model without rotary positions."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    if params is None and getattr(text, "rope_theta", None) is None:
        return None
    if isinstance(params, dict) and "default" not in str(params.get("rope_type", "default")):
        return float(params.get("factor") or 1.0)
    return 1.0


def check_positions(config: PretrainedConfig, seq_len: int) -> str | None:
    """An error for a `train.seq_len` past a model's learned position table; a warning (returned) for RoPE
    models, which run past their trained length but degrade."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if not isinstance(limit, int) or seq_len <= limit:
        return None
    factor = rope_factor(config)
    if factor is None:
        raise FTLError(
            f"`train.seq_len` is {seq_len} but {config.model_type} has learned positions for {limit} tokens "
            f"(max_position_embeddings): position {limit} has no embedding. Set `train.seq_len` to at most {limit}."
        )
    scaled = f" with RoPE scaling factor {factor:g}" if factor != 1.0 else ""
    return (
        f"`train.seq_len` {seq_len} is longer than the {limit} positions {config.model_type} was trained for{scaled} "
        "(rotary positions run past it, but quality degrades): lower seq_len or set a RoPE scaling in the model config."
    )
