"""Quality scorers: a score in [0, 1] per example and the reason for a low one.

`heuristic` is cheap and runs on every row: repeated n-grams in the answers (a looping model's
output), the share of characters that are not text (binary junk, markup soup), and answers with no
letters or digits at all. `judge` asks any OpenAI-compatible endpoint to grade each example with a
rubric; it runs only on the rows that survive the other filters, since every call costs.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from core.config import ConfigError
from jobs.config import JudgeConfig
from jobs.data.formats import turn_text

DEFAULT_RUBRIC = (
    "You grade training examples for fine-tuning a chat assistant. Rate the assistant's answers "
    "for being correct, helpful and well-formed given the user's request, from 1 (useless or "
    "wrong) to 10 (excellent). Reply with the number only."
)
ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
SCORE = re.compile(r"\b(10|[1-9])(?:\.\d+)?\b")


def answer_text(example: dict[str, Any]) -> str:
    if "text" in example:
        return example["text"]
    return "\n".join(turn_text(m) for m in example["messages"] if m["role"] == "assistant")


def repetition(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 for short texts)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 8:  # too short to call repetitive
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def non_text_ratio(text: str) -> float:
    """Share of characters that are neither letters, digits, punctuation nor spaces."""
    if not text:
        return 1.0
    if text.isascii():  # the common case, without a Python loop over characters
        return len(ASCII_CONTROL.findall(text)) / len(text)
    odd = sum(1 for ch in text if unicodedata.category(ch)[0] not in "LNPZ" and ch not in "\n\t")
    return odd / len(text)


def heuristic_score(example: dict[str, Any]) -> tuple[float, str]:
    """(score, what drags it down): 1 is clean; each problem caps the score."""
    answer = answer_text(example)
    checks = {
        "repetitive answer": 1 - repetition(answer),
        "non-text characters": 1 - 2 * non_text_ratio(answer),
        "answer has no letters or digits": 1.0 if any(ch.isalnum() for ch in answer) else 0.0,
    }
    reason = min(checks, key=checks.get)
    return max(0.0, round(checks[reason], 4)), reason


class JudgeScorer:
    """Grades examples through an OpenAI-compatible chat endpoint; 1-10 is mapped to [0, 1]."""

    def __init__(self, cfg: JudgeConfig):
        from openai import OpenAI

        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.cfg = cfg
        # the key stays inside the client; errors below never include it
        self.client = OpenAI(
            base_url=cfg.base_url, api_key=key or "none", timeout=cfg.timeout_s, max_retries=3
        )
        self.rubric = cfg.rubric or DEFAULT_RUBRIC

    def _prompt(self, example: dict[str, Any]) -> str:
        if "text" in example:
            return f"Text:\n{example['text']}"
        turns = [f"{m['role'].upper()}:\n{turn_text(m)}" for m in example["messages"]]
        if example.get("tools"):
            turns.insert(0, f"TOOLS:\n{json.dumps(example['tools'], ensure_ascii=False)}")
        return "\n\n".join(turns)

    def score_one(self, example: dict[str, Any]) -> tuple[float, str]:
        try:
            reply = self.client.chat.completions.create(
                model=self.cfg.model,
                messages=[
                    {"role": "system", "content": self.rubric},
                    {"role": "user", "content": self._prompt(example)},
                ],
                temperature=0,
                max_tokens=8,
            )
        except Exception as e:  # noqa: BLE001 - any transport error is reported the same way
            raise ConfigError(
                f"data.quality.judge: {self.cfg.base_url} failed: {type(e).__name__}"
                f" ({getattr(e, 'status_code', '') or 'no response'})"
            ) from None
        text = reply.choices[0].message.content or ""
        match = SCORE.search(text)
        if not match:
            return 0.0, f"judge gave no score ({text[:40]!r})"
        grade = float(match.group(1))
        return round((grade - 1) / 9, 4), f"judge grade {grade:g}/10"

    def score(self, examples: list[dict[str, Any]]) -> list[tuple[float, str]]:
        with ThreadPoolExecutor(self.cfg.max_concurrency) as pool:
            return list(pool.map(self.score_one, examples))
