"""Rows -> chat messages: the formats a row may come in, and their validation.

Formats (detected per row, or declared with data.format): OpenAI `messages`, ShareGPT
`conversations`, Alpaca `instruction/input/output`, `prompt/completion`. A bad row is reported
with file:line and a reason and counted; with data.on_error=fail the first one stops the job.

A `messages` row may carry OpenAI fine-tuning's tools: `tools` (function definitions),
`parallel_tool_calls`, assistant turns with `tool_calls` and `tool` turns with the results. Such a
row becomes {"messages", "tools"}; a row without `tools` is read exactly as before.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from jobs.data.sources import RowError

ROLES = {"system", "user", "assistant"}
TOOL_ROLES = ROLES | {"tool"}  # in a row with tools
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what OpenAI accepts as a function name
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
    if fmt == "messages" and row.get("tools"):
        return to_tool_example(row, system_prompt, fields or {})
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
            hint = " (a tool result needs the row's 'tools' list)" if role == "tool" else ""
            raise RowError(f"{name}[{i}]: unknown role {turn.get(keys.role)!r}{hint}")
        if turn.get("tool_calls"):
            raise RowError(f"{name}[{i}]: tool_calls, but the row has no 'tools' list")
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


# ---------------------------------------------------------------- rows with tools


def to_tool_example(
    row: dict[str, Any], system_prompt: str | None, fields: dict[str, str]
) -> dict[str, Any]:
    """A `messages` row with `tools` -> {"messages", "tools"}, validated: each call names a tool
    of the row with a JSON object of arguments (kept as a canonical JSON string), each result
    answers an earlier call, and parallel_tool_calls: false allows one call per turn."""
    tools = checked_tools(row["tools"])
    parallel = row.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RowError(f"field 'parallel_tool_calls' is {type(parallel).__name__}, not a boolean")
    keys = TurnKeys(fields.get("role", "role"), fields.get("content", "content"))
    turns = row.get("messages")
    if not isinstance(turns, list) or not turns:
        raise RowError("missing or empty 'messages' list")
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    messages = [
        checked_tool_turn(turn, f"messages[{i}]", keys, by_name, parallel)
        for i, turn in enumerate(turns)
    ]
    check_tool_turn_order(messages)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return {"messages": messages, "tools": tools}


def checked_tools(tools: Any) -> list[dict]:
    """The row's `tools`: {"type": "function", "function": {"name", "description"?,
    "parameters"?}} each, with distinct names; an error names the entry (tools[j])."""
    if not isinstance(tools, list):
        raise RowError(f"field 'tools' is {type(tools).__name__}, not a list")
    names = set()
    for j, tool in enumerate(tools):
        bad = f"tools[{j}]: malformed tool:"
        if not isinstance(tool, dict):
            raise RowError(f"{bad} {type(tool).__name__}, not an object")
        if tool.get("type") != "function":
            raise RowError(f"{bad} type is {tool.get('type')!r}, expected 'function'")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise RowError(f"{bad} 'function' is missing or not an object")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise RowError(
                f"{bad} function.name {name!r} is not a name (letters, digits, _ or -; 1-64)"
            )
        if name in names:
            raise RowError(f"{bad} a second tool named {name!r}")
        names.add(name)
        if not isinstance(fn.get("description", ""), str):
            raise RowError(f"{bad} function.description is not a string")
        params = fn.get("parameters", {"type": "object"})
        if (
            not isinstance(params, dict)
            or params.get("type", "object") != "object"
            or not isinstance(params.get("properties", {}), dict)
            or not isinstance(params.get("required", []), list)
        ):
            raise RowError(
                f"{bad} function.parameters of {name!r} is not a JSON schema of an object "
                '({"type": "object", "properties": {...}, "required": [...]})'
            )
    return tools


def checked_tool_turn(
    turn: Any, where: str, keys: TurnKeys, tools: dict[str, dict], parallel: bool
) -> dict:
    """One turn of a row with tools: {"role", "content"}, plus "tool_calls" (an assistant's
    calls; its content may then be null) or "tool_call_id" (a tool result)."""
    if not isinstance(turn, dict):
        raise RowError(f"{where} is not an object")
    role = turn.get(keys.role)
    if role not in TOOL_ROLES:
        raise RowError(f"{where}: unknown role {role!r}")
    content = turn.get(keys.content)
    calls = turn.get("tool_calls") if role == "assistant" else None
    if calls is not None:
        if not isinstance(calls, list) or not calls:
            raise RowError(f"{where}.tool_calls is not a non-empty list")
        if len(calls) > 1 and not parallel:
            raise RowError(
                f"{where}.tool_calls: {len(calls)} calls in one turn, but the row sets "
                "parallel_tool_calls: false"
            )
        if content is not None and not isinstance(content, str):
            raise RowError(f"{where}: content is {type(content).__name__}, not a string")
        calls = [checked_call(c, f"{where}.tool_calls[{k}]", tools) for k, c in enumerate(calls)]
        return {"role": role, "content": content or None, "tool_calls": calls}
    if not isinstance(content, str):
        raise RowError(f"{where}: content is {type(content).__name__}, not a string")
    if not content.strip():
        raise RowError(f"{where}: empty content")
    if role != "tool":
        return {"role": role, "content": content}
    call_id = turn.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise RowError(f"{where}: missing field 'tool_call_id' (the id of the call it answers)")
    return {"role": role, "content": content, "tool_call_id": call_id}


def checked_call(call: Any, where: str, tools: dict[str, dict]) -> dict:
    """One tool call: a known tool's name and its arguments, a JSON object as a string (kept in
    canonical form, so copies that differ in spacing hash alike)."""
    if not isinstance(call, dict):
        raise RowError(f"{where} is not an object")
    if call.get("type", "function") != "function":
        raise RowError(f"{where}.type is {call.get('type')!r}, expected 'function'")
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise RowError(f"{where}: missing field 'id'")
    fn = call.get("function")
    if not isinstance(fn, dict):
        raise RowError(f"{where}.function is missing or not an object")
    name = fn.get("name")
    if name not in tools:
        raise RowError(f"{where}: unknown tool {name!r} (the row's tools: {', '.join(tools)})")
    raw = fn.get("arguments")
    if not isinstance(raw, str):
        raise RowError(
            f"{where}.function.arguments is {type(raw).__name__}, not a string "
            "(OpenAI's format: a JSON object as text)"
        )
    try:
        arguments = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RowError(
            f"{where}.function.arguments are not valid JSON ({e.msg} at column {e.colno})"
        ) from None
    if not isinstance(arguments, dict):
        raise RowError(
            f"{where}.function.arguments are not a JSON object "
            f"(a {type(arguments).__name__}: {raw[:40]})"
        )
    missing = [
        k for k in tools[name].get("parameters", {}).get("required", []) if k not in arguments
    ]
    if missing:
        raise RowError(f"{where}.function.arguments lack required {missing} of tool {name!r}")
    canonical = json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": canonical}}


def check_tool_turn_order(messages: list[dict]) -> None:
    """user, then assistant; an assistant's tool calls are followed by their results (or end
    the row), results by more results or an assistant turn; each result answers an earlier call."""
    offset = 1 if messages[0]["role"] == "system" else 0
    body = messages[offset:]
    if not any(m["role"] == "assistant" for m in body):
        raise RowError("no assistant turn")
    call_ids: set[str] = set()
    previous = None
    for i, m in enumerate(body):
        if previous is None:
            expected = ("user",)
        elif previous["role"] == "user":
            expected = ("assistant",)
        elif previous["role"] == "assistant":
            expected = ("tool",) if previous.get("tool_calls") else ("user",)
        else:  # a tool result
            expected = ("tool", "assistant")
        if m["role"] not in expected:
            want = " or ".join(f"'{e}'" for e in expected)
            raise RowError(
                f"messages: turn {i + 1} is '{m['role']}', expected {want} (roles out of order)"
            )
        for call in m.get("tool_calls") or ():
            if call["id"] in call_ids:
                raise RowError(f"messages[{offset + i}]: a second call with id {call['id']!r}")
            call_ids.add(call["id"])
        if m["role"] == "tool" and m["tool_call_id"] not in call_ids:
            raise RowError(
                f"messages[{offset + i}]: tool_call_id {m['tool_call_id']!r} matches no earlier "
                "call"
            )
        previous = m


def turn_text(message: dict) -> str:
    """A turn's text for dedup and quality scores: its content, then its tool calls as
    name(arguments). A turn without tool calls: its content, as before tools existed."""
    calls = [
        f"{c['function']['name']}({c['function']['arguments']})"
        for c in message.get("tool_calls") or ()
    ]
    return "\n".join(([message["content"]] if message["content"] else []) + calls)
