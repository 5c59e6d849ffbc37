"""Messages -> token ids: the chat template's render, and labels masked to the answer turns."""

from __future__ import annotations

import json
from typing import Any

from core.config import ConfigError
from jobs.config import DataConfig
from jobs.data.sources import RowError

IGNORE_INDEX = -100  # positions the loss skips (prompt tokens, padding)


def render(example: dict[str, Any], tokenizer) -> str:
    """The text a model is trained on: the chat template's render, or the plain text."""
    if "text" in example:
        return example["text"]
    return tokenizer.apply_chat_template(
        template_messages(example["messages"]), tokenize=False, **tools_kwargs(example.get("tools"))
    )


def tools_kwargs(tools: list[dict] | None) -> dict[str, Any]:
    """apply_chat_template's keyword for a conversation's tools; none without tools, so those
    render exactly as they always have."""
    return {"tools": tools} if tools else {}


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates take them: a tool call's arguments as a dict, not the JSON
    text of OpenAI's format (jinja cannot parse JSON)."""
    return [
        {**m, "tool_calls": [parsed_call(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m
        for m in messages
    ]


def parsed_call(call: dict) -> dict:
    fn = call["function"]
    return {**call, "function": {**fn, "arguments": json.loads(fn["arguments"])}}


# ---------------------------------------------------------------- messages -> token ids


def tokenize_text(text: str, tokenizer, max_seq_len: int) -> dict[str, list[int]]:
    """Plain text (continued pre-training): every token is learned, the end-of-text token too."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_seq_len]
    return {"input_ids": ids, "labels": list(ids)}


def tokenize_example(example: dict[str, Any], tokenizer, max_seq_len: int):
    if "text" in example:
        return tokenize_text(example["text"], tokenizer, max_seq_len)
    return render_and_mask(example["messages"], tokenizer, max_seq_len, example.get("tools"))


def render_and_mask(
    messages: list[dict], tokenizer, max_seq_len: int, tools: list[dict] | None = None
) -> dict[str, list[int]]:
    """Render with the chat template; labels are the token ids of assistant turns, else -100.

    An assistant turn's text is what its render adds after the prompt for it (the generation
    prompt), so its closing end-of-turn token is learned too; a turn of tool calls is learned
    like any answer, while the tools header and the tool results are prompt. Tokens are matched
    to turns by their character offsets in the full render, so the ids are exactly those of the
    whole text.
    """
    messages, kw = template_messages(messages), tools_kwargs(tools)
    full = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True, **kw
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, **kw)
        if not (full.startswith(before) and full.startswith(upto)):
            raise ConfigError(
                "the tokenizer's chat template does not render conversations prefix by prefix; "
                "assistant-only loss masking needs that (set a different template)"
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for pos, (start, end) in enumerate(offsets):
        if end > start and any(a <= start < b for a, b in spans):
            labels[pos] = ids[pos]
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE_INDEX for label in labels):
        raise RowError(f"no assistant tokens within max_seq_len={max_seq_len}")
    return {"input_ids": ids, "labels": labels}


def prompt_and_answer(messages: list[dict]) -> tuple[list[dict], str]:
    """Split off the last assistant turn: the prompt a model is asked and the reference answer."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def tokenize_rows(rows, tokenizer, cfg: DataConfig, report: dict[str, Any]):
    """(token ids + labels, the examples kept) for (where, example) rows; a row whose answer lies
    past max_seq_len is dropped and listed in report["dropped_at_tokenize"]."""
    examples, kept = [], []
    for where, example in rows:
        try:
            examples.append(tokenize_example(example, tokenizer, cfg.max_seq_len))
            kept.append(example)
        except RowError as e:
            if cfg.on_error == "fail":
                raise ConfigError(f"{where}: {e} (data.on_error=fail)") from None
            report.setdefault("dropped_at_tokenize", []).append(f"{where}: {e}")
    return examples, kept
