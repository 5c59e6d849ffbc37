"""Normalization: Unicode form and whitespace, so copies that differ only there hash alike."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from jobs.config import NormalizeConfig
from jobs.data.sources import RowError

TRAILING_SPACE = re.compile(r"[ \t]+\n")
BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    """Unicode normal form and tidy whitespace, so copies that differ only there hash alike.

    Whitespace inside a line is kept (code indentation and tables mean something).
    """
    if cfg.unicode != "none":
        text = unicodedata.normalize(cfg.unicode, text)
    if cfg.whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = TRAILING_SPACE.sub("\n", text)
        text = BLANK_LINES.sub("\n\n", text).strip()
    return text


def normalize_example(example: dict[str, Any], cfg: NormalizeConfig) -> dict[str, Any]:
    if "text" in example:
        text = normalize_text(example["text"], cfg)
        if not text:
            raise RowError("field 'text' is empty after normalization")
        return {"text": text}
    messages = []
    for i, m in enumerate(example["messages"]):
        if m["content"] is None:  # a turn of tool calls only
            messages.append(m)
            continue
        content = normalize_text(m["content"], cfg)
        if not content and not m.get("tool_calls"):
            raise RowError(f"messages[{i}]: empty content after normalization")
        messages.append({**m, "content": content or None})
    if "tools" in example:
        return {"messages": messages, "tools": example["tools"]}
    return {"messages": messages}


def example_key(example: dict[str, Any]) -> str:
    """The canonical text of an example: what exact dedup and the dataset hash see."""
    return json.dumps(example, sort_keys=True, ensure_ascii=False)
