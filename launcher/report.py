"""What `ftl plan` and `ftl spec` print for a person: the plan as text, the spec as a field list.

Rendering only: every number comes from the Plan (launcher/planner.py) and every word about a field from
its docstring (launcher/spec.py, launcher/data_spec.py). Both fit a 100-column terminal: the table's
values carry no unit (the line above says it), and prose wraps at words, while the command stays one line to
copy.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ByteSize
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from launcher.memory import MemoryBreakdown
from launcher.planner import HEADROOM, Plan, estimate
from strategies.catalog import AUTO_ORDER

# Parts of the peak moment, in the order they are listed; with the overhead they add up to `total`.
PEAK_ROWS = (
    ("parameters", "params"), ("gradients", "grads"), ("optimizer", "optimizer"), ("activations", "activations"),
    ("logits", "logits"), ("temporaries", "temporaries"),
)
# Short enough that the 70B table fits 80 columns too; the caption spells them out.
MOMENT_SHORT = {"backward": "bwd", "end of backward": "bwd end", "optimizer step": "step"}
MOMENT_LEGEND = "peak at: bwd = during backward, bwd end = end of backward, step = optimizer step"


def print_plan(console: Console, job_plan: Plan, command: list[str], ds_config: dict | None = None) -> None:
    r = job_plan.request
    say = _prose(console)
    say(
        f"[bold]model[/]  {r.shape.params_total:,} parameters ({short_count(r.shape.params_total)}), "
        f"{r.params_trainable:,} trainable ({r.params_trainable / r.shape.params_total:.1%}), method {r.method}"
    )
    say(
        f"[bold]hardware[/]  {r.nodes} node(s) x {r.gpus_per_node} {r.device} = {r.world_size} ranks, "
        f"{gib(r.gpu_mem_bytes)} each, {r.precision}; micro-batch {r.micro_batch_size} x {r.seq_len} tokens, "
        f"activation checkpointing {'on' if r.activation_checkpointing else 'off'}"
    )
    title, table, legend = plan_table(job_plan)
    say(title)
    console.print(table)
    say(f"[dim]{legend}[/]")
    say(headline(job_plan))
    for strategy, why in job_plan.rejected:
        say(f"  rejected {strategy}: {escape(why)}")
    for warning in job_plan.warnings:
        say(f"[bold yellow]warning:[/] {escape(warning)}")
    if job_plan.suggestions:
        say("[bold]what would fit:[/]")
        for line in job_plan.suggestions:
            say(f"  - {escape(line)}")
    # One line, never wrapped: it is copied into a shell.
    console.print("[bold]command[/]  " + escape(" ".join(command)), soft_wrap=True)
    if ds_config:
        say("[bold]deepspeed config[/] (written to the run dir as deepspeed.json)")
        console.print_json(data=ds_config)


def headline(job_plan: Plan) -> str:
    """`strategy X` only when X is what would run: a plan where nothing fits says so first."""
    reason = escape(job_plan.reason)
    if job_plan.fits:
        return f"[bold green]strategy {job_plan.strategy}[/]: {reason}"
    if job_plan.request.strategy != "auto":
        return f"[bold red]does not fit[/] with the forced strategy {job_plan.strategy}: {reason}"
    return f"[bold red]does not fit[/] with any strategy: {reason}"


def plan_table(job_plan: Plan) -> tuple[str, Table, str]:
    """Per-rank device memory of every strategy at its own peak moment, whose parts (rows) add up to the
    total; host memory of the offloading strategies below it. The plan's strategy is starred when it fits
    or was forced. Returned with the title and legend printed above and below it."""
    r = job_plan.request
    shown = list(AUTO_ORDER) if job_plan.strategy in AUTO_ORDER else [*AUTO_ORDER, job_plan.strategy]
    estimates = {s: estimate(r, s) for s in shown}
    memory: dict[str, MemoryBreakdown] = {s: job_plan.per_rank if s == job_plan.strategy else e.memory for s, e in estimates.items()}
    fits = {s: job_plan.fits if s == job_plan.strategy else e.fits for s, e in estimates.items()}
    starred = job_plan.strategy if (job_plan.fits or r.strategy != "auto") else None
    unit, scale = ("GiB", 2**30) if max(m.total for m in memory.values()) >= 2**30 else ("MiB", 2**20)

    def cell(n: int) -> str:
        return f"{n / scale:,.1f}"

    # Title and legend are printed as prose around the table: rich widens a table to its title's length.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0, 0, 1))  # 2 spaces between columns
    table.add_column("")
    for name in shown:
        chosen = name == starred
        table.add_column(name + ("*" if chosen else ""), justify="right", style="bold green" if chosen and job_plan.fits else None)
    table.add_row("peak at", *(MOMENT_SHORT[memory[s].peak_moment] for s in shown))
    for label, key in PEAK_ROWS:
        table.add_row(label, *(cell(getattr(memory[s].at_peak, key)) for s in shown))
    table.add_row("overhead", *(cell(memory[s].overhead) for s in shown), end_section=True)
    table.add_row("total", *(cell(memory[s].total) for s in shown), end_section=True)
    table.add_row("host/node", *(cell(memory[s].host * r.gpus_per_node) if memory[s].host else "-" for s in shown))
    table.add_row("fits", *("yes" if fits[s] else "no" for s in shown))
    title = (f"[bold]per-rank memory[/] in {unit} at each strategy's peak (budget {int(HEADROOM * 100)}% of "
             f"{gib(r.gpu_mem_bytes)} = {gib(job_plan.budget_bytes)})")
    legend = MOMENT_LEGEND + (f"; * {'the chosen' if r.strategy == 'auto' else 'the forced'} strategy" if starred else "")
    return title, table, legend


def _prose(console: Console):
    """Print wrapped at words to the terminal's width (the module console does not wrap, for logs)."""

    def say(text: str) -> None:
        console.print(text, soft_wrap=False, overflow="fold")

    return say


def gib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:,.1f} GiB"
    return f"{n / 2**20:,.1f} MiB"


def short_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


@dataclass(frozen=True)
class SpecField:
    """One field of the job spec as `ftl spec` lists it."""

    path: str  # as written in an override: `train.lr`, `data.mixture.<i>.weight`
    type: str
    default: str  # "required" when the field has none
    meaning: str  # the field's docstring
    section: bool = False  # a block of further fields (`method.lora`)


def spec_fields(model: type[BaseModel], prefix: str = "") -> list[SpecField]:
    """Every field of `model` and of the sections under it, depth first, in declaration order."""
    fields = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        default = "required" if info.is_required() else _default_text(info.get_default(call_default_factory=True))
        meaning = " ".join((info.description or "").split())
        section, in_list = _section_of(info.annotation)
        if section is None:
            fields.append(SpecField(path, _type_text(info.annotation), default, meaning))
            continue
        kind = "list of sections" if in_list else "section"
        fields.append(SpecField(path, kind, default if in_list or default in ("required", "null") else "", meaning, section=True))
        fields.extend(spec_fields(section, f"{path}.<i>." if in_list else f"{path}."))
    return fields


def print_spec_fields(console: Console, model: type[BaseModel]) -> None:
    """The spec's fields grouped by top-level section: a line with path, type and default, then the meaning
    wrapped under it at the terminal's width."""
    for f in spec_fields(model):
        top = "." not in f.path
        if top:
            console.print()
        style = "bold underline" if top and f.section else "bold"
        head = Text(f.path, style=style)
        head.append(f"  {f.type}", style="cyan")
        if f.default:
            head.append(f"  = {f.default}" if f.default != "required" else "  (required)", style="dim" if f.default != "required" else "yellow")
        console.print(head, soft_wrap=False, overflow="fold")
        if f.meaning:
            # textwrap, not rich: rich pads wrapped lines to the full width with spaces.
            indent = "    "
            console.print(textwrap.fill(f.meaning, max(40, console.width), initial_indent=indent, subsequent_indent=indent),
                          markup=False, soft_wrap=True)


def _section_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the section model, whether it is a list of them) for `X`, `X | None`, `list[X]`, `list[X] | None`."""
    for arg in (annotation, *get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, False
        if get_origin(arg) is list and get_args(arg) and isinstance(get_args(arg)[0], type) and issubclass(get_args(arg)[0], BaseModel):
            return get_args(arg)[0], True
    return None, False


def _type_text(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, UnionType):
        return " | ".join(_type_text(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else _type_text(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if annotation is type(None):
        return "null"
    if annotation is ByteSize:
        return "size"  # with a unit: 80GB, 24GiB
    if annotation is Path:
        return "path"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, ByteSize):
        for unit, scale in (("TB", 10**12), ("GB", 10**9), ("GiB", 2**30), ("MB", 10**6), ("MiB", 2**20)):
            if value % scale == 0:
                return f"{value // scale}{unit}"
        return f"{int(value)}B"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_default_text(v) for v in value) + "]"
    return str(value)
