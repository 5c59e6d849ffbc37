"""Data preparation: JSONL rows -> chat messages -> token ids with prompt-masked labels.

Formats (detected per row, or declared with data.format): OpenAI `messages`, ShareGPT
`conversations`, Alpaca `instruction/input/output`, `prompt/completion`. A bad row is reported
with file:line and a reason and counted; with data.on_error=fail the first one stops the job.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jobs.config import ConfigError, DataConfig

IGNORE_INDEX = -100  # positions the loss skips (prompt tokens, padding)
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}  # fmt: skip


class RowError(ValueError):
    """A row that cannot become a training example; the message is the reason."""


@dataclass
class DataReport:
    rows_read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    examples: list[str] = field(default_factory=list)  # first few "file:line: reason"

    def drop(self, where: str, reason: str) -> None:
        self.dropped[reason] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {reason}")

    def as_dict(self) -> dict[str, Any]:
        return {"rows_read": self.rows_read, "kept": self.kept,
                "dropped": dict(self.dropped), "examples": self.examples}  # fmt: skip


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    eval_conversations: list[list[dict[str, str]]]  # for generated-answer metrics
    dataset_hash: str
    report: DataReport


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
    raise RowError(
        f"unknown format (keys: {sorted(row)}); expected messages, conversations, "
        "instruction/output or prompt/completion"
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


def to_messages(row: Any, fmt: str = "auto", system_prompt: str | None = None) -> list[dict]:
    """One row in any supported format -> validated OpenAI-style messages."""
    if not isinstance(row, dict):
        raise RowError(f"row is {type(row).__name__}, not an object")
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "messages":
        turns, role_key, content_key, role_map = row.get("messages"), "role", "content", None
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


def read_jsonl(path: Path):
    """Yield (line_number, parsed row or RowError) for each non-blank line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                # a byte-order mark some editors put at the start of a file is not part of row 1
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield line_no, RowError(f"invalid UTF-8 at byte {e.start}")
                continue
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text.rstrip("\r\n"))  # error columns within the line
            except json.JSONDecodeError as e:
                yield line_no, RowError(f"invalid JSON ({e.msg} at column {e.colno})")


# ---------------------------------------------------------------- messages -> token ids


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


# ---------------------------------------------------------------- splits, hashes, batches


def _content_key(messages: list[dict]) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def is_eval_row(messages: list[dict], fraction: float, seed: int) -> bool:
    """Hash-based split: a row's side depends only on its content, so adding rows moves none."""
    digest = hashlib.sha256(f"{seed}:{_content_key(messages)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def dataset_hash(train: list[list[dict]], eval_: list[list[dict]]) -> str:
    h = hashlib.sha256()
    for name, convs in (("train", train), ("eval", eval_)):
        h.update(name.encode())
        for conv in convs:
            h.update(_content_key(conv).encode())
            h.update(b"\n")
    return "sha256:" + h.hexdigest()


def load_conversations(
    files: list[str], cfg: DataConfig, report: DataReport
) -> list[tuple[str, list[dict]]]:
    """Valid rows as (file:line, messages); every other row is reported (or fails the job)."""
    convs = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"data: file not found: {path}")
        for line_no, row in read_jsonl(path):
            report.rows_read += 1
            try:
                if isinstance(row, RowError):
                    raise row
                convs.append((f"{path}:{line_no}", to_messages(row, cfg.format, cfg.system_prompt)))
            except RowError as e:
                if cfg.on_error == "fail":
                    raise ConfigError(f"{path}:{line_no}: {e} (data.on_error=fail)") from None
                report.drop(f"{path}:{line_no}", str(e))
    return convs


def tokenize_all(
    convs: list[tuple[str, list[dict]]], tokenizer, cfg: DataConfig, report: DataReport
):
    examples, kept = [], []
    for where, conv in convs:
        try:
            examples.append(render_and_mask(conv, tokenizer, cfg.max_seq_len))
            kept.append(conv)
        except RowError as e:
            if cfg.on_error == "fail":
                raise ConfigError(f"{where}: {e} (data.on_error=fail)") from None
            report.drop(where, str(e))
    return examples, kept


def prepare_data(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Read, validate, split and tokenize; raises ConfigError when a split ends up empty."""
    report = DataReport()
    convs = load_conversations(cfg.train_files, cfg, report)
    if cfg.eval_files:
        train_convs, eval_convs = convs, load_conversations(cfg.eval_files, cfg, report)
    else:
        flags = [is_eval_row(c, cfg.eval_fraction, seed) for _, c in convs]
        train_convs = [c for c, e in zip(convs, flags, strict=True) if not e]
        eval_convs = [c for c, e in zip(convs, flags, strict=True) if e]
    train, train_convs = tokenize_all(train_convs, tokenizer, cfg, report)
    eval_, eval_convs = tokenize_all(eval_convs, tokenizer, cfg, report)
    report.kept = len(train) + len(eval_)
    if not train:
        raise ConfigError(f"data.train_files: no usable training rows ({report.as_dict()})")
    if not eval_:
        field_name = "data.eval_files" if cfg.eval_files else "data.eval_fraction"
        raise ConfigError(
            f"{field_name}: the held-out set is empty; give more rows or a larger fraction"
        )
    return PreparedData(train, eval_, eval_convs, dataset_hash(train_convs, eval_convs), report)


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
