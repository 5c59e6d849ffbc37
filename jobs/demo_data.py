"""The quickstart's task: classify a short product review as positive, negative or mixed.

A tiny randomly initialised model can visibly learn it in a few minutes on a CPU: the answer
depends on which adjectives appear, so a held-out review (unseen combination) tests generalisation
rather than recall. `python -m jobs.demo_data OUT.jsonl` regenerates the shipped file exactly;
`--pairs` writes the same task as preference pairs (data/review_pairs.jsonl, train.method: dpo),
`--prompts` as prompts with the label a grader checks (data/review_prompts.jsonl, grpo).
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

SYSTEM = "Classify the sentiment of the review as positive, negative or mixed."
NOUNS = [
    "battery",
    "screen",
    "keyboard",
    "camera",
    "speaker",
    "price",
    "design",
    "charger",
    "delivery",
    "packaging",
    "manual",
    "handle",
    "lid",
    "strap",
    "app",
    "fabric",
]
POSITIVE = [
    "excellent",
    "great",
    "superb",
    "reliable",
    "sturdy",
    "lovely",
    "fantastic",
    "smooth",
    "bright",
    "comfortable",
    "fast",
    "solid",
]
NEGATIVE = [
    "awful",
    "terrible",
    "flimsy",
    "broken",
    "noisy",
    "slow",
    "dull",
    "cheap",
    "fragile",
    "useless",
    "sticky",
    "poor",
]
TEMPLATES = [
    "The {n1} is {a1} and the {n2} is {a2}.",
    "I found the {n1} {a1}, while the {n2} felt {a2}.",
    "{A1} {n1}. {A2} {n2}.",
    "Honestly the {n1} was {a1}; the {n2} was {a2} too.",
]


def make_review(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative", "mixed"])
    if label == "positive":
        a1, a2 = rng.sample(POSITIVE, 2)
    elif label == "negative":
        a1, a2 = rng.sample(NEGATIVE, 2)
    else:
        a1, a2 = rng.choice(POSITIVE), rng.choice(NEGATIVE)
        if rng.random() < 0.5:
            a1, a2 = a2, a1
    n1, n2 = rng.sample(NOUNS, 2)
    text = rng.choice(TEMPLATES).format(
        n1=n1, n2=n2, a1=a1, a2=a2, A1=a1.capitalize(), A2=a2.capitalize()
    )
    return text, label


def unique_reviews(rng: random.Random):
    """(text, label) of reviews never seen before, drawn from rng for as long as asked."""
    seen = set()
    while True:
        text, label = make_review(rng)
        if text not in seen:
            seen.add(text)
            yield text, label


def make_rows(n: int = 800, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for text, label in itertools.islice(unique_reviews(rng), n):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Review: {text}"},
                    {"role": "assistant", "content": label},
                ]
            }
        )
    return rows


def make_preference_rows(n: int = 320, seed: int = 7) -> list[dict]:
    """The same task as preference pairs: the right label is chosen, a wrong one rejected."""
    rng = random.Random(seed)
    rows = []
    for text, label in itertools.islice(unique_reviews(rng), n):
        wrong = rng.choice([x for x in ("positive", "negative", "mixed") if x != label])
        rows.append(
            {
                "prompt": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Review: {text}"},
                ],
                "chosen": [{"role": "assistant", "content": label}],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    return rows


def make_prompt_rows(n: int = 480, seed: int = 11) -> list[dict]:
    """The same task as GRPO prompts: no answer turn; `answer` is what the grader compares."""
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Review: {text}"},
            ],
            "answer": label,
        }
        for text, label in itertools.islice(unique_reviews(rng), n)
    ]


def corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the task's vocabulary plus common English."""
    words = " ".join(NOUNS + POSITIVE + NEGATIVE + [w.capitalize() for w in POSITIVE + NEGATIVE])
    filler = (
        "the a an and or but is was were be to of in on for with as at by from this that it "
        "you your I we they he she what which who how why when where yes no not answer question "
        "user assistant system hello please thank thanks good bad review classify sentiment "
        "positive negative mixed neutral translate summarize write explain list number one two "
        "three four five six seven eight nine ten"
    )
    texts = [words, filler]
    texts += [json.dumps(r) for r in make_rows(200, seed=1)]
    return texts


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    # python -m jobs.demo_data [--pairs | --prompts] [OUT.jsonl]
    args = sys.argv[1:]
    if args[:1] == ["--pairs"]:
        write_jsonl(args[1] if len(args) > 1 else "data/review_pairs.jsonl", make_preference_rows())
    elif args[:1] == ["--prompts"]:
        write_jsonl(args[1] if len(args) > 1 else "data/review_prompts.jsonl", make_prompt_rows())
    else:
        write_jsonl(args[0] if args else "data/reviews.jsonl", make_rows())
