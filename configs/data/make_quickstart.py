"""Writes the quickstart data set: short templated sentences with learnable structure (a fixed seed,
so the shipped files are reproducible). Run from the repo root: python configs/data/make_quickstart.py"""

import json
import random
from pathlib import Path

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]
THINGS = ["apples", "books", "cups", "drums", "eggs", "flags", "gems", "hats", "kites", "lamps"]
COLORS = ["red", "blue", "green", "gold", "pink", "gray"]
PLACES = ["market", "library", "harbor", "garden", "station", "museum"]


def sentence(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    n, m = rng.randint(2, 9), rng.randint(2, 9)
    thing, color, place = rng.choice(THINGS), rng.choice(COLORS), rng.choice(PLACES)
    return rng.choice(
        [
            f"{a} has {n} {color} {thing} and {b} has {m}, so together they have {n + m} {thing}.",
            f"At the {place}, {a} gave {b} {n} {color} {thing}.",
            f"{a} went to the {place} to buy {n} {thing}; {b} stayed home.",
            f"If {a} has {n} {thing} and buys {m} more, {a} has {n + m} {thing}.",
        ]
    )


def main() -> None:
    out = Path(__file__).parent
    for name, count, seed in (("quickstart.jsonl", 3000, 0), ("quickstart-val.jsonl", 200, 1)):
        rng = random.Random(seed)
        with open(out / name, "w") as fh:
            for _ in range(count):
                fh.write(json.dumps({"text": sentence(rng)}) + "\n")


if __name__ == "__main__":
    main()
