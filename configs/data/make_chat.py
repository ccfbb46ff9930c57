"""Writes configs/data/chat*.jsonl, the small chat set of configs/chat.yaml (fixed seed: reproducible).
Run from the repo root: python configs/data/make_chat.py

Each conversation has a system turn and two user/assistant exchanges about small sums; the loss is on
the assistant turns only (the byte tokenizer has no chat template: FTL's built-in one renders them).
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def conversation(rng: random.Random) -> dict:
    a, b, c = rng.randrange(10), rng.randrange(10), rng.randrange(10)
    return {"messages": [
        {"role": "system", "content": "You add small numbers."},
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        {"role": "user", "content": f"And plus {c}?"},
        {"role": "assistant", "content": f"{a + b} plus {c} is {a + b + c}."},
    ]}


if __name__ == "__main__":
    for name, n, seed in (("chat.jsonl", 1500, 3), ("chat-val.jsonl", 100, 4)):
        rng = random.Random(seed)
        (HERE / name).write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(n)))
