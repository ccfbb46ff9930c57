"""Writes the small task data sets the method examples and tests use (fixed seeds: reproducible).
Run from the repo root: python configs/data/make_tasks.py

- topics*.jsonl: 4-class topic classification ({"text", "label"}). Training sentences use 8 keywords per
  topic; validation sentences also use 4 held-out ones, which only a model with pretrained word
  knowledge can place: the gap between a random-init and a pretrained model shows in the accuracy.
- completions*.jsonl: prompt/completion pairs ({"prompt", "completion"}) for completion-only loss.
"""

import json
import random
from pathlib import Path

TOPICS = {
    "sports": (
        ["football", "tennis", "goal", "referee", "match", "team", "score", "tournament"],
        ["basketball", "hockey", "stadium", "coach"],
    ),
    "food": (
        ["recipe", "soup", "bread", "kitchen", "dinner", "flavor", "chef", "oven"],
        ["pasta", "breakfast", "dessert", "restaurant"],
    ),
    "weather": (
        ["rain", "storm", "forecast", "snow", "wind", "sunny", "cloudy", "temperature"],
        ["thunder", "humid", "hurricane", "drizzle"],
    ),
    "technology": (
        ["computer", "software", "internet", "laptop", "program", "network", "robot", "smartphone"],
        ["database", "algorithm", "processor", "website"],
    ),
}
FRAMES = [
    "I read a long article about the {a} and the {b} yesterday.",
    "Everyone was talking about the {a} this morning.",
    "My friend told me the {a} was better than the {b}.",
    "We spent the whole afternoon thinking about the {a}.",
    "The news mentioned the {a} and also the {b}.",
    "Nobody expected the {a} to matter so much today.",
]


def topic_sentence(rng: random.Random, words: list[str]) -> str:
    a, b = rng.sample(words, 2)
    return rng.choice(FRAMES).format(a=a, b=b)


def completion(rng: random.Random) -> dict:
    x, y = rng.randint(0, 9), rng.randint(0, 9)
    return {"prompt": f"Q: what is {x} plus {y}? A:", "completion": f" {x + y}."}


def main() -> None:
    out = Path(__file__).parent
    for name, count, seed, held_out in (("topics.jsonl", 800, 0, False), ("topics-val.jsonl", 200, 1, True)):
        rng = random.Random(seed)
        rows = []
        for i in range(count):
            label = list(TOPICS)[i % len(TOPICS)]
            seen, unseen = TOPICS[label]
            rows.append({"text": topic_sentence(rng, seen + unseen if held_out else seen), "label": label})
        rng.shuffle(rows)
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, count, seed in (("completions.jsonl", 1000, 2), ("completions-val.jsonl", 100, 3)):
        rng = random.Random(seed)
        (out / name).write_text("".join(json.dumps(completion(rng)) + "\n" for _ in range(count)))


if __name__ == "__main__":
    main()
