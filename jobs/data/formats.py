"""Rows -> chat messages: the formats a row may come in, and their validation.

Formats (detected per row, or declared with data.format): OpenAI `messages`, ShareGPT
`conversations`, Alpaca `instruction/input/output`, `prompt/completion`. A bad row is reported
with file:line and a reason and counted; with data.on_error=fail the first one stops the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs.data.sources import RowError

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


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


@dataclass(frozen=True)
class TurnKeys:
    """Where a format keeps a turn's role and content, and its role names -> ours."""

    role: str = "role"
    content: str = "content"
    roles: dict[str, str] | None = None


SHAREGPT_KEYS = TurnKeys("from", "value", SHAREGPT_ROLES)


def to_messages(
    row: Any, fmt: str = "auto", system_prompt: str | None = None, fields: dict | None = None
) -> list[dict]:
    """One row in any chat format -> validated OpenAI-style messages."""
    if not isinstance(row, dict):
        raise RowError(f"row is {type(row).__name__}, not an object")
    fmt = detect_format(row) if fmt == "auto" else fmt
    turns, keys = raw_turns(row, fmt, fields or {})
    name = {"messages": "messages", "sharegpt": "conversations"}.get(fmt, "turns")
    messages = checked_messages(turns, name, keys)
    check_turn_order(messages, name)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def raw_turns(row: dict[str, Any], fmt: str, fields: dict[str, str]) -> tuple[Any, TurnKeys]:
    """A chat-format row's turns as they are, and where their roles and contents are."""
    if fmt == "messages":
        keys = TurnKeys(fields.get("role", "role"), fields.get("content", "content"))
        return row.get("messages"), keys
    if fmt == "sharegpt":
        return row.get("conversations"), SHAREGPT_KEYS
    if fmt == "alpaca":
        prompt = _text(row, "instruction")
        extra = _text(row, "input", required=False)
        turns = [
            {"role": "user", "content": f"{prompt}\n\n{extra}" if extra.strip() else prompt},
            {"role": "assistant", "content": _text(row, "output")},
        ]
        if row.get("system"):
            turns.insert(0, {"role": "system", "content": _text(row, "system")})
        return turns, TurnKeys()
    if fmt == "prompt_completion":
        turns = [
            {"role": "user", "content": _text(row, "prompt")},
            {"role": "assistant", "content": _text(row, "completion")},
        ]
        return turns, TurnKeys()
    if fmt == "text":
        raise RowError("plain text row where a conversation is expected")
    raise RowError(f"unknown format '{fmt}'")


def checked_messages(turns: Any, name: str, keys: TurnKeys) -> list[dict]:
    """The turns as {"role", "content"} messages; an error names the turn (`name`[i])."""
    if not isinstance(turns, list) or not turns:
        raise RowError(f"missing or empty '{name}' list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"{name}[{i}] is not an object")
        role = turn.get(keys.role)
        role = keys.roles.get(role, role) if keys.roles else role
        if role not in ROLES:
            raise RowError(f"{name}[{i}]: unknown role {turn.get(keys.role)!r}")
        content = turn.get(keys.content)
        if not isinstance(content, str):
            raise RowError(f"{name}[{i}]: content is {type(content).__name__}, not a string")
        if not content.strip():
            raise RowError(f"{name}[{i}]: empty content")
        messages.append({"role": role, "content": content})
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
