"""One raw data row -> text segments, each marked supervised (loss on it) or not, per data format; and
segments -> token ids and labels (-100 where there is no loss). Pure functions: no I/O, no FTLError.

A row that does not fit its format raises `BadRow` (the caller skips and counts it, or fails naming the
file and row); a chat template whose renders are not prefixes of each other raises `ChatTemplateError`;
`detect_format` raises ValueError naming the columns. The caller turns each into an FTLError."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import jinja2
from transformers import PreTrainedTokenizerBase

Segment = tuple[str, bool]  # (text, supervised)
FORMATS = ("text", "completion", "alpaca", "chat", "classification")
ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label torch's cross-entropy skips


@dataclass(frozen=True)
class Fields:
    """The column that holds each part of a row."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    label: str = "label"


class BadRow(Exception):
    """A row that does not fit its format; `reason` names the field and what is wrong with it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChatTemplateError(Exception):
    """The chat template does not render a conversation as a growing prefix, so the loss mask cannot be cut."""


# The Alpaca prompt as alpaca-lora's templates/alpaca.json writes it (Stanford's original lacks the
# newline after "### Response:"). Unsupervised; the output that follows is the supervised part.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def detect_format(columns: Iterable[str], task: str = "causal_lm", fields: Fields = Fields()) -> str:
    """The format of a file with these columns: messages -> chat, instruction+output -> alpaca,
    prompt+completion -> completion, text -> text (first match wins); text+label -> classification,
    which is the only choice when `task` is classification and never chosen otherwise."""
    have = set(columns)
    needs = {
        "chat": (fields.messages,),
        "alpaca": (fields.instruction, fields.output),
        "completion": (fields.prompt, fields.completion),
        "text": (fields.text,),
    }
    if task == "classification":
        needs = {"classification": (fields.text, fields.label)}
    for fmt, needed in needs.items():
        if all(name in have for name in needed):
            return fmt
    wants = "; ".join(f"`{fmt}` needs {' and '.join(repr(n) for n in needed)}" for fmt, needed in needs.items())
    raise ValueError(
        f"Cannot tell the data format from the columns {sorted(have)}: {wants}. "
        "Name the format explicitly, or point the field names at the columns that hold these parts."
    )


def segments(
    row: dict, fmt: str, fields: Fields = Fields(), tokenizer: PreTrainedTokenizerBase | None = None
) -> list[Segment]:
    """The row as (text, supervised) segments, for `text`, `completion`, `alpaca` or `chat` (which needs the
    tokenizer: its chat template, else its EOS text for the built-in template). Empty segments are dropped.
    Resolve `auto` once per file with `detect_format`; `classification` rows go through `classification_example`."""
    if fmt == "text":
        return [(_string(row, fields.text), True)]
    if fmt == "completion":
        return _nonempty([(_string(row, fields.prompt, empty_ok=True), False), (_string(row, fields.completion), True)])
    if fmt == "alpaca":
        instruction, given = _string(row, fields.instruction), _string(row, fields.input, optional=True)
        template = ALPACA_PROMPT if given else ALPACA_PROMPT_NO_INPUT
        return [(template.format(instruction=instruction, input=given), False), (_string(row, fields.output), True)]
    if fmt == "chat":
        if tokenizer is None:
            raise ValueError("The chat format needs the tokenizer (its chat template, or its EOS for the built-in one).")
        return _chat(_messages(row, fields.messages), fields.messages, tokenizer)
    raise ValueError(f"segments() takes a format of {FORMATS[:4]}, not {fmt!r}")


def classification_example(row: dict, fields: Fields = Fields()) -> tuple[str, int | str]:
    """The text and the raw label (a class id or a class name); the caller maps names to ids."""
    text = _string(row, fields.text)
    label = row.get(fields.label)
    if label is None:
        raise BadRow(f"field {fields.label!r} is missing")
    if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
        raise BadRow(f"field {fields.label!r} is {label!r}; a label is a class id (int) or a class name (string)")
    return text, label


def tokenize_segments(
    segs: list[Segment], tokenizer: PreTrainedTokenizerBase, eos: bool
) -> tuple[list[int], list[int]]:
    """Token ids and labels (the id where supervised, -100 elsewhere), without BOS. With `eos`, an EOS token
    follows, supervised: pass True for text/completion/alpaca, False for chat (its template ends each turn).

    A fast tokenizer tokenizes the joined text once and labels each token by the segment holding its last
    character: tokenizing segments apart would give other ids at the seams than the model sees at
    inference (a SentencePiece `Metaspace` tokenizer prepends "▁" to every separate call). A slow one
    (ByT5's bytes) has no offsets, so each segment is tokenized on its own."""
    ids: list[int] = []
    labels: list[int] = []
    if tokenizer.is_fast:
        ends = list(itertools.accumulate(len(text) for text, _ in segs))
        encoded = tokenizer("".join(text for text, _ in segs), add_special_tokens=False, return_offsets_mapping=True)
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            seg = min(bisect.bisect_right(ends, max(end - 1, start)), len(segs) - 1)
            ids.append(token)
            labels.append(token if segs[seg][1] else IGNORE)
    else:
        for text, supervised in segs:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if supervised else [IGNORE] * len(piece)
    if eos:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no EOS token to end the example with")
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def render_builtin(messages: list[dict], eos_text: str, add_generation_prompt: bool = False) -> str:
    """The template for a tokenizer without one: a message is `<|role|>\\n{content}\\n`, except that an
    assistant's content ends with the EOS text instead of the newline (the model learns to stop; and
    tokenizers such as ByT5 strip whitespace around EOS); the generation prompt is `<|assistant|>\\n`.
    E.g. `<|system|>\\nBe brief.\\n<|user|>\\nHi\\n<|assistant|>\\nHello</s><|user|>\\n...`."""
    ends = {"system": "\n", "user": "\n", "assistant": eos_text}
    parts = [f"<|{m['role']}|>\n{m['content']}{ends[m['role']]}" for m in messages]
    return "".join(parts) + ("<|assistant|>\n" if add_generation_prompt else "")


def _chat(messages: list[dict], field: str, tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
    """Cut from rendered prefixes, so no `{% generation %}` tags are needed (stock Llama-3.1, Qwen and Gemma
    templates lack them). For assistant message k: render(messages[:k], add_generation_prompt) is the prompt,
    unsupervised; what render(messages[:k+1]) adds to it is the turn as the template ends it (content plus
    e.g. `<|eot_id|>`), supervised. Messages after the last assistant turn carry no loss and are dropped."""

    def render(upto: int, prompt: bool) -> str:
        if not getattr(tokenizer, "chat_template", None):
            return render_builtin(messages[:upto], tokenizer.eos_token or "", prompt)
        try:
            return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)
        except jinja2.TemplateError as exc:  # the template's raise_exception, e.g. "roles must alternate"
            raise BadRow(f"field {field!r}: the chat template refuses these messages: {exc}") from None

    segs: list[Segment] = []
    done, done_name = "", ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if k == 0:
            raise BadRow(f"field {field!r}: {field}[0] is an assistant turn; a chat opens with a system or user message")
        prompt, prompt_name = render(k, True), f"{field}[:{k}] with the assistant prompt"
        full, full_name = render(k + 1, False), f"{field}[:{k + 1}]"
        _check_prefix(done, done_name, prompt, prompt_name, f"{field}[{k}]")
        _check_prefix(prompt, prompt_name, full, full_name, f"{field}[{k}]")
        segs += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done, done_name = full, full_name
    if not segs:
        raise BadRow(f"field {field!r} has no assistant turn, so nothing to learn")
    return _nonempty(segs)


def _check_prefix(shorter: str, shorter_name: str, longer: str, longer_name: str, turn: str) -> None:
    if longer.startswith(shorter):
        return
    at = next((i for i, (a, b) in enumerate(zip(shorter, longer)) if a != b), min(len(shorter), len(longer)))
    raise ChatTemplateError(
        f"The chat template is not incremental at the assistant turn {turn}: the render of "
        f"{shorter_name} is not a prefix of the render of {longer_name}; they differ at character {at} "
        f"({shorter[at : at + 40]!r} vs {longer[at : at + 40]!r}). The loss mask is cut from rendered prefixes, so "
        "a template that rewrites earlier turns (e.g. strips <think> from past assistant turns) or depends on "
        "the conversation's length cannot be masked. Use a template without that behaviour."
    )


def _messages(row: dict, field: str) -> list[dict]:
    value = row.get(field)
    if value is None:
        raise BadRow(f"field {field!r} is missing")
    if not isinstance(value, list):
        raise BadRow(f"field {field!r} is a {type(value).__name__}, not a list of {{role, content}} messages")
    messages = []
    for i, message in enumerate(value):
        where = f"field {field!r}: {field}[{i}]"
        if not isinstance(message, dict):
            raise BadRow(f"{where} is a {type(message).__name__}, not a {{role, content}} object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRow(f"{where}.role is {role!r}; a role is one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadRow(f"{where}.content is a {type(content).__name__}, not a string")
        if role == "assistant" and not content:
            raise BadRow(f"{where}.content is empty: an assistant turn with nothing to learn")
        messages.append({"role": role, "content": content})
    return messages


def _string(row: dict, field: str, *, empty_ok: bool = False, optional: bool = False) -> str:
    value = row.get(field)
    if value is None:
        if optional:
            return ""
        raise BadRow(f"field {field!r} is missing")
    if not isinstance(value, str):
        raise BadRow(f"field {field!r} is a {type(value).__name__}, not a string")
    if not value and not (empty_ok or optional):
        raise BadRow(f"field {field!r} is empty")
    return value


def _nonempty(segs: list[Segment]) -> list[Segment]:
    return [(text, supervised) for text, supervised in segs if text]
