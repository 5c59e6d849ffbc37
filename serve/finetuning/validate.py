"""A job's files checked row by row before anything trains, in OpenAI's formats: chat rows
({"messages": [...]}) for supervised jobs, preference rows ({"input": {"messages": [...]},
"preferred_output": [...], "non_preferred_output": [...]}) for dpo, prompt rows ({"messages":
[... up to the user's turn], fields the grader reads}) for reinforcement. The first bad row fails the
job with an error naming the file and the line. DPO rows are written out in the pair format
jobs/data/pairs.py reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from core import storage
from jobs.data.formats import to_example
from jobs.data.pairs import to_pair
from jobs.data.prompts import to_prompt
from jobs.data.sources import RowError


class InvalidFile(Exception):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.error = {
            "code": "invalid_training_file"
            if param == "training_file"
            else "invalid_validation_file",
            "message": message,
            "param": param,
        }


@dataclass
class Checked:
    rows: int
    tokens: int  # over all rows, with the chat template: what one epoch trains on
    pairs: list[dict] | None  # dpo: the rows as prompt/chosen/rejected


def openai_pair(row: Any) -> dict:
    if not isinstance(row, dict):
        raise RowError(f"row is {type(row).__name__}, not an object")
    missing = [k for k in ("input", "preferred_output", "non_preferred_output") if k not in row]
    if missing:
        raise RowError(
            f"missing field(s) {missing}; expected input, preferred_output, non_preferred_output"
        )
    messages = row["input"].get("messages") if isinstance(row["input"], dict) else None
    if not isinstance(messages, list):
        raise RowError("field 'input.messages' must be a list of messages")
    return to_pair(
        {
            "prompt": messages,
            "chosen": row["preferred_output"],
            "rejected": row["non_preferred_output"],
        }
    )


def count_tokens(tokenizer, messages: list[dict] | None, text: str | None) -> int:
    if messages is not None:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    return len(tokenizer(text)["input_ids"])


def count_row(row: Any, kind: str, tokenizer, pairs: list | None) -> int:
    """The row validated for the job's method; the tokens it trains on (a prompt's, for grpo)."""
    if kind == "dpo":
        pair = openai_pair(row)
        pairs.append(pair)
        return count_tokens(tokenizer, pair["prompt"] + pair["chosen"], None)
    if kind == "grpo":  # OpenAI's RFT rows: messages up to the user's turn, fields for graders
        messages, _ = to_prompt(row)
        return count_tokens(tokenizer, messages, None)
    example = to_example(row)
    return count_tokens(tokenizer, example.get("messages"), example.get("text"))


def check_file(uri: str, filename: str, param: str, kind: str, tokenizer) -> Checked:
    """`kind`: the job's train.method (sft, dpo or grpo)."""
    dpo = kind == "dpo"
    rows, tokens, pairs = 0, 0, [] if dpo else None
    with storage.open_url(uri, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                tokens += count_row(row, kind, tokenizer, pairs)
            except (UnicodeDecodeError, json.JSONDecodeError, RowError) as e:
                what = (
                    f"invalid JSON ({e.msg} at column {e.colno})"
                    if isinstance(e, json.JSONDecodeError)
                    else str(e)
                )
                raise InvalidFile(f"{filename}, line {line_no}: {what}", param) from None
            rows += 1
    if rows == 0:
        raise InvalidFile(f"{filename}: no rows", param)
    return Checked(rows, tokens, pairs)


def write_pairs(pairs: list[dict], uri: str) -> None:
    fs, path = storage.filesystem(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        for pair in pairs:
            f.write(json.dumps(pair) + "\n")
