"""The checks the CLI makes before any rank starts (`ftl run`, its `--dry-run`, `ftl submit`): the run dir
can be written, the model's positions cover `train.seq_len`, and every data file parses, has the columns
of its format, supervises something and holds a batch for every rank.

The data check tokenizes each source into the cache the ranks read (launcher/token_cache.py), so the
ranks find every entry built and tokenize nothing: a mistake in a file is one paragraph here, naming the
file and line, instead of a paragraph per rank under torchrun's failure report 20 s later. (On a cluster
whose nodes do not share `data.cache_dir` with the submitting machine, the ranks build their own entry
from the same files.) Writes nothing in the run dir.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from launcher.errors import FTLError
from launcher.spec import JobSpec

Say = Callable[[str], None]


def check_output_dir(path: Path) -> None:
    """`output_dir` is a folder this user can write, or can be created: checked without creating it."""
    path = Path(path).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            raise FTLError(f"`output_dir` {path} is a file, not a folder. Point output_dir at a folder (new, or this job's earlier run).")
        if not os.access(path, os.W_OK | os.X_OK):
            raise FTLError(f"`output_dir` {path} is not writable by this user. Point output_dir at a folder you can write, or fix its permissions.")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FTLError(f"`output_dir` {path} cannot be created: {parent} is a file, not a folder. Point output_dir elsewhere.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FTLError(f"`output_dir` {path} cannot be created: {parent} is not writable by this user. Point output_dir at a folder you can write.")


def check_data(spec: JobSpec, config, ranks: int, say: Say) -> None:
    """Every data file tokenized into the cache (or found there) and checked, in this one process."""
    from launcher.data import build_tokenizer, check_vocab, label_names_of, open_sources
    from launcher.schedule import Schedule
    from launcher.spec import SourceSpec

    tokenizer = build_tokenizer(spec)
    vocab = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", None)
    if isinstance(vocab, int):
        check_vocab(tokenizer, vocab)
    schedule = Schedule.from_spec(spec)
    unique = list({s.label: s for phase in schedule.phases for s in phase.sources}.values())
    sources = {s.name: s for s in open_sources(spec, tokenizer, unique)}
    for source in sources.values():
        stats = source.stats
        say(f"data {source.name}: {len(source)} examples from {stats['rows']} rows"
            + (f", {stats['bad_rows']} bad rows skipped" if stats["bad_rows"] else "")
            + (f" (tokenized in {stats['tokenize_s']} s)" if source.built else " (from the cache)"))
    label_names = label_names_of(spec, list(sources.values())) if spec.task.name == "classification" else None
    if spec.data.few_shot:
        from launcher.data import few_shot_rows

        for i, source in enumerate(sources.values()):  # a class with fewer than k examples is named here
            few_shot_rows(spec, source, spec.data.few_shot, spec.train.seed + i)
    step_examples = ranks * spec.train.micro_batch_size
    for phase in schedule.phases if not spec.data.few_shot else ():  # few-shot: k-row subsets (classes checked above)
        have = sum(len(sources[s.label]) for s in phase.sources)
        if have < step_examples:
            where = f"phase {phase.name!r}'s sources" if len(schedule.phases) > 1 else "the training data"
            raise FTLError(
                f"{where} hold {have} examples after tokenizing{' and packing into train.seq_len blocks' if spec.data.pack is not False else ''}, "
                f"but one micro-batch on every rank takes {step_examples} ({ranks} ranks x train.micro_batch_size "
                f"{spec.train.micro_batch_size}): each rank would see repeats of the same rows in every batch. Add data, "
                "or lower train.micro_batch_size or the number of ranks (--gpus)."
            )
    held_out = [(spec.data.validation, None)] if spec.data.validation is not None else []
    held_out += [(e.path, e.format) for e in spec.data.eval_sets]
    for path, fmt in held_out:
        open_sources(spec, tokenizer, [SourceSpec(path=path, format=fmt)])
    if label_names is not None and spec.data.validation is not None:
        from launcher.data import load_examples

        load_examples(spec, tokenizer, spec.data.validation, label_names)  # a class unseen in training is named


def run_checks(spec: JobSpec, ranks: int, say: Say, data: bool = True) -> list[str]:
    """All of the above; returns the warnings (the caller prints them): `train.seq_len` against the model's
    positions. The model config (its errors raised by build_config) is built once for every check."""
    from launcher.model_checks import check_positions
    from launcher.model_info import build_config

    check_output_dir(spec.output_dir)
    config = build_config(spec.model)
    warning = check_positions(config, spec.train.seq_len)
    if data:
        check_data(spec, config, ranks, say)
    return [warning] if warning else []
