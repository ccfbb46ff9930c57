"""launcher.formats: each format's segments and loss mask, chat templates without generation tags,
bad rows, and format detection. ByT5's byte tokenizer keeps decoding exact."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from launcher.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    BadRow,
    ChatTemplateError,
    Fields,
    classification_example,
    detect_format,
    render_builtin,
    segments,
    tokenize_segments,
)

# Llama 3.1's header / end-of-turn structure, without `{% generation %}` tags (as the stock template).
LLAMA3_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Qwen3-like: past assistant turns lose their <think> block, so a longer render rewrites a shorter one.
THINK_STRIPPING_TEMPLATE = (
    "{% for m in messages %}"
    "{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ c }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def byte_tokenizer(template: str | None = None) -> ByT5Tokenizer:
    tokenizer = ByT5Tokenizer()
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def supervised_spans(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    """The decoded text of each maximal run of supervised tokens."""
    spans, run = [], []
    for token, label in [*zip(ids, labels), (None, -100)]:
        if label != -100:
            assert label == token
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans


def unsupervised_text(ids: list[int], labels: list[int], tokenizer) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label == -100])


def test_text_is_one_supervised_segment_and_ends_with_eos():
    tok = byte_tokenizer()
    segs = segments({"text": "héllo"}, "text")
    assert segs == [("héllo", True)]
    ids, labels = tokenize_segments(segs, tok, eos=True)
    assert ids == labels and ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "héllo</s>"


def test_completion_masks_the_prompt():
    tok = byte_tokenizer()
    segs = segments({"prompt": "Q: 2+2?\nA: ", "completion": "4"}, "completion")
    assert segs == [("Q: 2+2?\nA: ", False), ("4", True)]
    ids, labels = tokenize_segments(segs, tok, eos=True)
    assert supervised_spans(ids, labels, tok) == ["4</s>"]
    assert unsupervised_text(ids, labels, tok) == "Q: 2+2?\nA: "


def test_completion_with_an_empty_prompt_is_all_supervised():
    assert segments({"prompt": "", "completion": "4"}, "completion") == [("4", True)]


def test_configured_field_names_are_read():
    fields = Fields(prompt="question", completion="answer")
    assert segments({"question": "Q", "answer": "A"}, "completion", fields) == [("Q", False), ("A", True)]


def test_alpaca_with_and_without_input():
    with_input = segments({"instruction": "Translate.", "input": "chat", "output": "cat"}, "alpaca")
    assert with_input == [(ALPACA_PROMPT.format(instruction="Translate.", input="chat"), False), ("cat", True)]
    assert with_input[0][0].endswith("### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\n")
    for row in ({"instruction": "Say hi.", "input": "", "output": "hi"}, {"instruction": "Say hi.", "output": "hi"}):
        prompt, output = segments(row, "alpaca")
        assert prompt == (ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi."), False) and output == ("hi", True)
        assert "### Input" not in prompt[0] and prompt[0].endswith("### Instruction:\nSay hi.\n\n### Response:\n")


def test_classification_returns_text_and_raw_label():
    assert classification_example({"text": "great", "label": 1}) == ("great", 1)
    assert classification_example({"body": "meh", "y": "neutral"}, Fields(text="body", label="y")) == ("meh", "neutral")


def test_llama3_style_template_without_generation_tags_masks_all_but_assistant_turns():
    tok = byte_tokenizer(LLAMA3_TEMPLATE)
    segs = segments({"messages": CHAT}, "chat", tokenizer=tok)
    assert "".join(text for text, _ in segs) == tok.apply_chat_template(CHAT, tokenize=False)
    ids, labels = tokenize_segments(segs, tok, eos=False)
    assert supervised_spans(ids, labels, tok) == ["Paris.<|eot_id|>", "Rome.<|eot_id|>"]
    prompt_side = unsupervised_text(ids, labels, tok)
    for text in ("Be brief.", "Capital of France?", "And of Italy?", "<|start_header_id|>assistant<|end_header_id|>\n\n"):
        assert text in prompt_side
    assert "Paris" not in prompt_side and "Rome" not in prompt_side


def test_messages_after_the_last_assistant_turn_are_dropped():
    tok = byte_tokenizer(LLAMA3_TEMPLATE)
    segs = segments({"messages": [*CHAT, {"role": "user", "content": "Thanks!"}]}, "chat", tokenizer=tok)
    assert segs == segments({"messages": CHAT}, "chat", tokenizer=tok)


def test_builtin_template_when_the_tokenizer_has_none():
    tok = byte_tokenizer()
    segs = segments({"messages": CHAT}, "chat", tokenizer=tok)
    assert "".join(text for text, _ in segs) == render_builtin(CHAT, "</s>")
    assert segs[0] == ("<|system|>\nBe brief.\n<|user|>\nCapital of France?\n<|assistant|>\n", False)
    ids, labels = tokenize_segments(segs, tok, eos=False)
    assert supervised_spans(ids, labels, tok) == ["Paris.</s>", "Rome.</s>"]
    assert labels[-1] != -100  # the last turn's EOS is learned
    assert "Capital of France?" in unsupervised_text(ids, labels, tok)


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_turn():
    tok = byte_tokenizer(THINK_STRIPPING_TEMPLATE)
    one_turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>greet</think>Hello"}]
    assert segments({"messages": one_turn}, "chat", tokenizer=tok)[-1] == ("<think>greet</think>Hello<|im_end|>\n", True)
    two_turns = [*one_turn, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye"}]
    with pytest.raises(ChatTemplateError, match=r"turn messages\[3\].*not a prefix"):
        segments({"messages": two_turns}, "chat", tokenizer=tok)


def test_a_template_that_depends_on_the_conversation_length_is_refused():
    tok = byte_tokenizer("{{ messages | length }} turns\n{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ChatTemplateError, match=r"messages\[1\]"):
        segments({"messages": CHAT[1:3]}, "chat", tokenizer=tok)


def test_a_template_refusing_the_messages_is_a_bad_row():
    tok = byte_tokenizer("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}x")
    with pytest.raises(BadRow, match="'messages'.*no system role"):
        segments({"messages": CHAT}, "chat", tokenizer=tok)


@pytest.mark.parametrize(
    ("row", "fmt", "field"),
    [
        ({}, "text", "'text' is missing"),
        ({"text": None}, "text", "'text' is missing"),
        ({"text": ""}, "text", "'text' is empty"),
        ({"text": 3}, "text", "'text' is a int"),
        ({"prompt": "Q"}, "completion", "'completion' is missing"),
        ({"prompt": ["Q"], "completion": "A"}, "completion", "'prompt' is a list"),
        ({"prompt": "Q", "completion": ""}, "completion", "'completion' is empty"),
        ({"instruction": "", "output": "x"}, "alpaca", "'instruction' is empty"),
        ({"instruction": "Do.", "input": 5, "output": "x"}, "alpaca", "'input' is a int"),
        ({"instruction": "Do."}, "alpaca", "'output' is missing"),
        ({}, "chat", "'messages' is missing"),
        ({"messages": "hi"}, "chat", "'messages' is a str, not a list"),
        ({"messages": ["hi"]}, "chat", r"messages\[0\] is a str"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "chat", r"messages\[0\].role is 'bot'"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, "chat", r"messages\[0\].content is a list"),
        ({"messages": [{"role": "user"}]}, "chat", r"messages\[0\].content is a NoneType"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "chat", "'messages' has no assistant turn"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "chat", r"messages\[1\].content is empty"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "chat", r"messages\[0\] is an assistant turn"),
    ],
)
def test_bad_rows_name_the_field(row, fmt, field):
    with pytest.raises(BadRow, match=field) as caught:
        segments(row, fmt, tokenizer=byte_tokenizer(LLAMA3_TEMPLATE))
    assert caught.value.reason == str(caught.value)


@pytest.mark.parametrize(
    ("row", "field"),
    [({"label": 1}, "'text' is missing"), ({"text": "x"}, "'label' is missing"), ({"text": "x", "label": 0.5}, "'label' is 0.5"),
     ({"text": "x", "label": True}, "'label' is True")],
)
def test_bad_classification_rows_name_the_field(row, field):
    with pytest.raises(BadRow, match=field):
        classification_example(row)


@pytest.mark.parametrize(
    ("columns", "task", "fmt"),
    [
        (["messages"], "causal_lm", "chat"),
        (["messages", "text"], "causal_lm", "chat"),
        (["instruction", "input", "output"], "causal_lm", "alpaca"),
        (["instruction", "output", "text"], "causal_lm", "alpaca"),
        (["prompt", "completion"], "causal_lm", "completion"),
        (["text"], "causal_lm", "text"),
        (["text", "label"], "causal_lm", "text"),
        (["text", "label"], "classification", "classification"),
    ],
)
def test_detect_format(columns, task, fmt):
    assert detect_format(columns, task) == fmt


def test_detect_format_uses_the_configured_names():
    assert detect_format(["q", "a"], "causal_lm", Fields(prompt="q", completion="a")) == "completion"


def test_detect_format_error_lists_columns_and_needs():
    with pytest.raises(ValueError) as caught:
        detect_format(["question", "answer"], "causal_lm")
    message = str(caught.value)
    assert "['answer', 'question']" in message
    for need in ("`chat` needs 'messages'", "`alpaca` needs 'instruction' and 'output'", "`completion` needs 'prompt' and 'completion'", "`text` needs 'text'"):
        assert need in message
    with pytest.raises(ValueError, match="`classification` needs 'text' and 'label'"):
        detect_format(["text"], "classification")


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style fast tokenizer: `Metaspace` prepends "▁" to the start of every call."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"])
    tok.train_from_iterator(["Q: capital of France? A: Paris", "Q: capital of Italy? A: Rome"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def test_fast_tokenizer_tokenizes_the_joined_text_once():
    tok = metaspace_tokenizer()
    segs = [("Q: capital of France? A:\n", False), ("Paris", True)]
    ids, labels = tokenize_segments(segs, tok, eos=True)
    assert ids == tok("Q: capital of France? A:\nParis", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    apart = [t for text, _ in segs for t in tok(text, add_special_tokens=False)["input_ids"]]
    assert ids[:-1] != apart  # what tokenizing segments apart would have given
    supervised = [t for t, label in zip(ids, labels) if label != -100]
    assert tok.decode(supervised[:-1]).strip() == "Paris" and supervised[-1] == tok.eos_token_id
    assert "Paris" not in tok.decode([t for t, label in zip(ids, labels) if label == -100])
