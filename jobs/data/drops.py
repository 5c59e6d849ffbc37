"""Why a row is not in a split: the named drop reasons, and dropped.jsonl, which lists each such row.

A row is dropped at the first stage that rejects it, in this order: it does not parse or validate
(malformed), it repeats another row exactly or nearly, it is too short or too long, its quality
score is low.
"""

from __future__ import annotations

import json
from enum import IntEnum
from pathlib import Path

MAX_ERROR_EXAMPLES = 100  # per manifest; dropped.jsonl has every one
KEPT = 0  # a row's code in the decision arrays when no drop applies


class Drop(IntEnum):
    """A drop reason, in stage order. Its value is a row's code in the decision arrays (KEPT: in
    a split); `count_name` is what manifest.json counts it as and dropped.jsonl's `stage`."""

    MALFORMED = 1
    EXACT = 2
    NEAR = 3
    SHORT = 4
    LONG = 5
    LOW = 6

    @property
    def count_name(self) -> str:
        return COUNT_NAMES[self]


COUNT_NAMES = {
    Drop.MALFORMED: "malformed",
    Drop.EXACT: "exact_duplicates",
    Drop.NEAR: "near_duplicates",
    Drop.SHORT: "too_short",
    Drop.LONG: "too_long",
    Drop.LOW: "low_quality",
}
# What the decisions on arrays drop (a malformed row never gets that far).
DECIDED = (Drop.EXACT, Drop.NEAR, Drop.SHORT, Drop.LONG, Drop.LOW)
# The count key of a malformed row: the first of these its reason contains.
MALFORMED_KINDS = (
    # rows with tools (formats.to_tool_example); before the generic kinds their reasons contain
    "malformed tool",
    "unknown tool",
    "arguments are not valid JSON",
    "arguments are not a JSON object",
    "arguments lack required",
    "matches no earlier call",
    "parallel_tool_calls: false",
    "invalid JSON",
    "invalid UTF-8",
    "unknown role",
    "roles out of order",
    "no assistant turn",
    "missing field",
    "missing or empty",
    "empty content",
    "not a string",
    "unknown format",
    "not an object",
    "is empty",
)


def malformed_kind(reason: str) -> str:
    """'messages[2]: unknown role 'bot'' -> 'unknown role': the count key of a malformed row."""
    for kind in MALFORMED_KINDS:
        if kind in reason:
            return kind
    return reason.split(" (")[0][:60]


class DroppedLog:
    """dropped.jsonl: every row that is not in a split, with the stage and the reason; the first
    MAX_ERROR_EXAMPLES of them also go into the manifest."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.examples: list[dict[str, str]] = []

    def write(self, where: str, drop: Drop, reason: str, duplicate_of: str | None = None) -> None:
        entry = {"where": where, "stage": drop.count_name, "reason": reason}
        if duplicate_of:
            entry["duplicate_of"] = duplicate_of
        self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        if len(self.examples) < MAX_ERROR_EXAMPLES:
            self.examples.append(entry)

    def close(self) -> None:
        self.file.close()
