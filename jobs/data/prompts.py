"""Reinforcement fine-tuning (`train.method: grpo`), the data side: prompts and what graders read.

Rows, in TRL's prompt-only formats or the usual chat formats without the final assistant turn:
  {"prompt": "...", "answer": "positive"}                        the prompt becomes a user turn
  {"prompt": [messages], "answer": ...}
  {"messages": [messages ending with the user's turn], "answer": ...}     (OpenAI's RFT rows)
Every other field of the row is the grader's `item` ({{ item.answer }}), as in OpenAI's
reinforcement fine-tuning. Prompts are rendered with the chat template and its generation
prompt, so the adapter is trained on what serving will send it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from core.config import ConfigError
from jobs.config import DataConfig
from jobs.data.formats import to_messages
from jobs.data.normalize import normalize_text
from jobs.data.pairs import read_keyed_rows
from jobs.data.prepared import PreparedData
from jobs.data.sources import RowError

PROMPT_KEYS = ("prompt", "messages", "conversations")


def to_prompt(row: Any, system_prompt: str | None = None) -> tuple[list[dict], dict[str, Any]]:
    """One row -> (validated prompt messages, the grader's item: the row's other fields)."""
    if not isinstance(row, dict):
        raise RowError(f"row is {type(row).__name__}, not an object")
    key = next((k for k in PROMPT_KEYS if k in row), None)
    if key is None:
        raise RowError(f"missing field 'prompt' or 'messages' (keys: {sorted(row)})")
    turns = row[key]
    if isinstance(turns, str) and key == "prompt":
        turns = [{"role": "user", "content": turns}]
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field '{key}' must be a non-empty string or list of messages")
    if isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
        raise RowError(
            f"field '{key}' ends with an assistant turn: a GRPO prompt ends with the user's "
            "turn (put the reference answer in a field the grader reads, e.g. 'answer')"
        )
    # to_messages checks roles, contents and turn order of a whole conversation: one with a
    # placeholder answer, which is then taken off
    if key == "conversations":
        row_, fmt = {key: [*turns, {"from": "gpt", "value": "-"}]}, "sharegpt"
    else:
        row_, fmt = {"messages": [*turns, {"role": "assistant", "content": "-"}]}, "messages"
    whole = to_messages(row_, fmt, system_prompt)
    item = {k: v for k, v in row.items() if k not in PROMPT_KEYS}
    return whole[:-1], item


def tokenize_prompt(messages: list[dict], tokenizer, room: int) -> list[int]:
    """The prompt's token ids with the generation prompt; `room` tokens at most."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > room:
        raise RowError(
            f"the prompt has {len(ids)} tokens; data.max_seq_len minus "
            f"train.grpo.max_completion_length leaves room for {room}"
        )
    return ids


def prepare_prompts(cfg: DataConfig, tokenizer, seed: int, completion_len: int) -> PreparedData:
    """The job's train/eval prompts (a source's split, else a hash of the prompt and item).
    A bad row is reported with file:line and counted, or stops the job (data.on_error=fail)."""
    splits, counts, errors = read_prompts(cfg, tokenizer, seed, cfg.max_seq_len - completion_len)
    digest = hashlib.sha256()
    for split in ("train", "eval"):
        counts[split] = len(splits[split])
        for key, _ in splits[split]:
            digest.update(f"{split}\t{key}\n".encode())
    digest.update(f"max_seq_len={cfg.max_seq_len}".encode())
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    if not splits["train"]:
        raise ConfigError(f"data: no usable prompts ({summary})")
    if not splits["eval"]:
        raise ConfigError(
            f"data: the held-out set of prompts is empty ({summary}); give more rows, a larger "
            "data.eval_fraction or eval files"
        )
    examples = {
        split: [{**ex, "index": i} for i, (_, ex) in enumerate(splits[split])]
        for split in ("train", "eval")
    }
    return PreparedData(
        train=examples["train"],
        eval=examples["eval"],
        eval_conversations=[],
        dataset_hash="sha256:" + digest.hexdigest(),
        report={"counts": counts, "errors": errors[:10], "prepared": "inline (prompts)"},
    )


def read_prompts(cfg: DataConfig, tokenizer, seed: int, room: int):
    """({split: [(canonical text, {"prompt_ids", "item", "messages"})]}, counts, errors) over
    every source (jobs/data/pairs.py's read_keyed_rows)."""

    def parse(row):
        messages, item = to_prompt(row, cfg.system_prompt)
        messages = [{**m, "content": normalize_text(m["content"], cfg.normalize)} for m in messages]
        ids = tokenize_prompt(messages, tokenizer, room)
        key = json.dumps([messages, item], sort_keys=True, ensure_ascii=False)
        return key, {"prompt_ids": ids, "item": item, "messages": messages}

    return read_keyed_rows(cfg, seed, parse)
