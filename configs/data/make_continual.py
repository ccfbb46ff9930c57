"""Writes the two tasks of configs/continual.yaml (fixed seeds: reproducible). Run from the repo root:
python configs/data/make_continual.py

Both tasks read a sequence of digits (after a one-letter tag naming the task) and disagree on the
answer: `reverse` writes it backwards, `sort` in ascending order. Learning the second overwrites the first
unless some of the first is replayed, which is what continual fine-tuning has to manage.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
DIGITS = 3


def rows(tag: str, rule, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        digits = [str(rng.randrange(10)) for _ in range(DIGITS)]
        out.append({"prompt": f"{tag} " + " ".join(digits) + " =", "completion": " " + " ".join(rule(digits))})
    return out


def write(name: str, data: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in data))


if __name__ == "__main__":
    for task, rule, seed in (("reverse", lambda d: d[::-1], 1), ("sort", sorted, 2)):
        write(f"continual-{task}.jsonl", rows(task[0], rule, 2000, seed))
        write(f"continual-{task}-val.jsonl", rows(task[0], rule, 200, seed + 100))
