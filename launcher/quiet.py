"""Third-party notices that are not the user's business, hidden where FTL calls the library that prints
them; `ftl --verbose` shows them all (FTL_VERBOSE=1, launcher/rank_env.py: the ranks inherit it).

Each warning filter names its message, so anything else the same library says still shows: a user who
learns to skip noise misses the real warning next to it.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

from launcher.rank_env import verbose_requested

# (message at its start, category): each is said on every run, and nothing in it is for the user to act on.
NOISE_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # transformers 5 renamed gradient_checkpointing_enable (an alias until v6); FTL calls the name that every
    # supported transformers (>= 4.46) has. Said by `ftl plan` on every plan with activation checkpointing.
    (r"`gradient_checkpointing_enable` is deprecated", FutureWarning),
    # bitsandbytes' and peft's imports define TorchScript methods, which torch deprecates.
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning),
    # torch.distributed.checkpoint read by one process (`ftl export`, the final model): what FTL means to do.
    (r"torch\.distributed is disabled, unavailable or uninitialized", UserWarning),
    # DeepSpeed's ZeRO-3 gathers and scatters through collectives torch 2.13 renamed: said on every step.
    (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning),
)

# DeepSpeed's own logger (it sets its level when imported, so a filter, not a level, holds it).
DEEPSPEED_LOGGER = "DeepSpeed"


def hide_library_warnings() -> None:
    """Install the warning filters in this process (the CLI's, a rank's), unless verbose."""
    if verbose_requested():
        return
    _filter_noise_warnings()


def _filter_noise_warnings() -> None:
    for message, category in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Around a call into transformers or DeepSpeed (unless verbose): their log lines below ERROR,
    transformers' progress bars and the NOISE_WARNINGS are not shown, in any process (the Slurm and Ray
    drivers that write a run's final model install no filters of their own). Seen without it: BertLMHeadModel's "add `is_decoder=True`"
    when the planner sizes a BERT body as a causal LM; "Setting accelerator to CPU" from DeepSpeed's import
    (transformers' save_pretrained imports it); "Writing model shards" / "Loading weights" bars on export.
    Errors still show, and exceptions pass through unchanged."""
    if verbose_requested():
        yield
        return
    from transformers.utils import logging as hf_logging  # the callers have imported transformers already

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    deepspeed, below_error = logging.getLogger(DEEPSPEED_LOGGER), _BelowError()
    deepspeed.addFilter(below_error)
    try:
        with warnings.catch_warnings():
            _filter_noise_warnings()
            yield
    finally:
        deepspeed.removeFilter(below_error)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
