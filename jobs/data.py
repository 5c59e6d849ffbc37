"""Data preparation: JSONL rows -> chat messages -> token ids with prompt-masked labels.

Formats (detected per row, or declared with data.format): OpenAI `messages`, ShareGPT
`conversations`, Alpaca `instruction/input/output`, `prompt/completion`. A bad row is reported
with file:line and a reason and counted; with data.on_error=fail the first one stops the job.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

import torch

from jobs.config import ConfigError, NormalizeConfig
from jobs.sources import RowError

TRAILING_SPACE = re.compile(r"[ \t]+\n")
BLANK_LINES = re.compile(r"\n{3,}")
IGNORE_INDEX = -100  # positions the loss skips (prompt tokens, padding)
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}  # fmt: skip


# ---------------------------------------------------------------- rows -> messages


def detect_format(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise RowError(
        f"unknown format (keys: {sorted(row)}); expected messages, conversations, "
        "instruction/output, prompt/completion or text"
    )


def _text(row: dict[str, Any], key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise RowError(f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field '{key}' is {type(value).__name__}, not a string")
    if required and not value.strip():
        raise RowError(f"field '{key}' is empty")
    return value


def map_fields(row: Any, fields: dict[str, str] | None) -> Any:
    """Rename a source's odd column names to ours ({ours: theirs}); other keys are left alone."""
    if not fields or not isinstance(row, dict):
        return row
    row = dict(row)
    for ours, theirs in fields.items():
        if ours not in ("role", "content") and theirs in row:
            row[ours] = row.pop(theirs)
    return row


def to_example(
    row: Any, fmt: str = "auto", system_prompt: str | None = None, fields: dict | None = None
) -> dict[str, Any]:
    """One row -> {"messages": [...]} (chat formats) or {"text": "..."} (plain text), validated."""
    row = map_fields(row, fields)
    if not isinstance(row, dict):
        raise RowError(f"row is {type(row).__name__}, not an object")
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "text":
        return {"text": _text(row, "text")}
    return {"messages": to_messages(row, fmt, system_prompt, fields)}


def to_messages(
    row: Any, fmt: str = "auto", system_prompt: str | None = None, fields: dict | None = None
) -> list[dict]:
    """One row in any chat format -> validated OpenAI-style messages."""
    if not isinstance(row, dict):
        raise RowError(f"row is {type(row).__name__}, not an object")
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "messages":
        fields = fields or {}
        turns, role_key, content_key, role_map = (
            row.get("messages"),
            fields.get("role", "role"),
            fields.get("content", "content"),
            None,
        )
    elif fmt == "sharegpt":
        turns, role_key, content_key, role_map = (
            row.get("conversations"),
            "from",
            "value",
            SHAREGPT_ROLES,
        )
    elif fmt == "alpaca":
        prompt = _text(row, "instruction")
        extra = _text(row, "input", required=False)
        turns = [{"role": "user", "content": f"{prompt}\n\n{extra}" if extra.strip() else prompt},
                 {"role": "assistant", "content": _text(row, "output")}]  # fmt: skip
        if row.get("system"):
            turns.insert(0, {"role": "system", "content": _text(row, "system")})
        role_key, content_key, role_map = "role", "content", None
    elif fmt == "prompt_completion":
        turns = [{"role": "user", "content": _text(row, "prompt")},
                 {"role": "assistant", "content": _text(row, "completion")}]  # fmt: skip
        role_key, content_key, role_map = "role", "content", None
    elif fmt == "text":
        raise RowError("plain text row where a conversation is expected")
    else:
        raise RowError(f"unknown format '{fmt}'")

    key = {"messages": "messages", "sharegpt": "conversations"}.get(fmt, "turns")
    if not isinstance(turns, list) or not turns:
        raise RowError(f"missing or empty '{key}' list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"{key}[{i}] is not an object")
        role = turn.get(role_key)
        role = role_map.get(role, role) if role_map else role
        if role not in ROLES:
            raise RowError(f"{key}[{i}]: unknown role {turn.get(role_key)!r}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise RowError(f"{key}[{i}]: content is {type(content).__name__}, not a string")
        if not content.strip():
            raise RowError(f"{key}[{i}]: empty content")
        messages.append({"role": role, "content": content})
    check_turn_order(messages, key)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def check_turn_order(messages: list[dict], key: str) -> None:
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not any(m["role"] == "assistant" for m in body):
        raise RowError("no assistant turn")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RowError(
                f"{key}: turn {i + 1} is '{m['role']}', expected '{expected}' (roles out of order)"
            )


# ---------------------------------------------------------------- normalization


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
        content = normalize_text(m["content"], cfg)
        if not content:
            raise RowError(f"messages[{i}]: empty content after normalization")
        messages.append({"role": m["role"], "content": content})
    return {"messages": messages}


def example_key(example: dict[str, Any]) -> str:
    """The canonical text of an example: what exact dedup and the dataset hash see."""
    return json.dumps(example, sort_keys=True, ensure_ascii=False)


def render(example: dict[str, Any], tokenizer) -> str:
    """The text a model is trained on: the chat template's render, or the plain text."""
    if "text" in example:
        return example["text"]
    return tokenizer.apply_chat_template(example["messages"], tokenize=False)


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
    return render_and_mask(example["messages"], tokenizer, max_seq_len)


def render_and_mask(messages: list[dict], tokenizer, max_seq_len: int) -> dict[str, list[int]]:
    """Render with the chat template; labels are the token ids of assistant turns, else -100.

    An assistant turn's text is what its render adds after the prompt for it (the generation
    prompt), so its closing end-of-turn token is learned too. Tokens are matched to turns by their
    character offsets in the full render, so the ids are exactly those of the whole text.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
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


# ---------------------------------------------------------------- batches


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), for exact resume."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_micro_batches(
    order: list[int], step_in_epoch: int, effective: int, rank: int, world: int, micro: int
):
    """This rank's micro-batches (lists of example indices) for one optimizer step.

    A step always takes the same `effective` examples from the epoch order, split evenly over the
    ranks and then into micro-batches: the worker count and micro-batch size change how a step
    is computed, never which examples it sees.
    """
    step = order[step_in_epoch * effective : (step_in_epoch + 1) * effective]
    per_rank = effective // world
    mine = step[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + micro] for i in range(0, per_rank, micro)]


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack(
    examples: list[dict[str, list[int]]], max_len: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Several examples per row, so that rows carry tokens instead of padding.

    First-fit decreasing into rows of `max_len` tokens. Each example's position ids restart at
    0: transformers turns those resets into a block-diagonal causal mask (sdpa, eager) or
    variable-length attention (flash-attention 2), so no example attends to another, and the
    first label of each example is dropped, since in a row of its own nothing predicts it. The
    step's loss is the same as with `collate`; only the padding is gone. `attention_mask` marks
    the real tokens for counting; it must not reach the model, which would then ignore the
    position-id resets.
    """
    rows: list[list[dict]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True):
        n = len(e["input_ids"])
        i = next((i for i, free in enumerate(room) if free >= n), None)
        if i is None:
            rows.append([]), room.append(max_len)
            i = len(rows) - 1
        rows[i].append(e)
        room[i] -= n
    width = max(max_len - free for free in room)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            ids[r, at : at + n] = torch.tensor(e["input_ids"])
            labels[r, at + 1 : at + n] = torch.tensor(e["labels"][1:])
            positions[r, at : at + n] = torch.arange(n)
            mask[r, at : at + n] = 1
            at += n
        positions[r, at:] = torch.arange(width - at)  # the tail's padding is a block of its own
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}
