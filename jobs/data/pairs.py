"""Preference tuning (`train.method: dpo`), the data side: prompt/chosen/rejected pairs.

Rows, in TRL's preference formats (detected per row):
  {"prompt": "...", "chosen": "...", "rejected": "..."}          the prompt becomes a user turn and
                                                                 each answer an assistant turn
  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  {"chosen": [messages], "rejected": [messages]}                 the shared leading turns are the prompt
Every pair is rendered with the chat template, like SFT rows, so the adapter is served the same way.

Their batches are jobs/batching.py's collate_pairs; the loss, TRL's own DPO code, is in
jobs/preference.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from core.config import ConfigError
from jobs.config import DataConfig
from jobs.data.drops import Drop
from jobs.data.formats import to_messages
from jobs.data.normalize import normalize_text
from jobs.data.prepared import PreparedData
from jobs.data.sources import RowError, expand_source, read_rows
from jobs.data.split import key_split

# ---------------------------------------------------------------- rows -> pairs of conversations


def to_pair(row: Any, system_prompt: str | None = None) -> dict[str, list[dict]]:
    """One preference row -> validated {"prompt", "chosen", "rejected"} message lists."""
    if not isinstance(row, dict):
        raise RowError(f"row is {type(row).__name__}, not an object")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise RowError(f"missing field(s) {missing}; expected prompt/chosen/rejected")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str) or not prompt.strip():
            raise RowError(
                "field 'prompt' must be a non-empty string when chosen/rejected are strings"
            )
        prompt = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    elif isinstance(chosen, list) and isinstance(rejected, list):
        if prompt is None:  # implicit prompt: the turns both conversations share
            shared = 0
            while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        elif not isinstance(prompt, list):
            raise RowError("field 'prompt' must be a list of messages when chosen/rejected are")
    else:
        raise RowError(
            f"chosen is {type(chosen).__name__} and rejected {type(rejected).__name__}: "
            "give two strings or two message lists"
        )
    if not prompt or not chosen or not rejected:
        raise RowError("empty prompt, chosen or rejected (or chosen equals rejected)")
    pair = {}
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        # to_messages checks roles, contents and turn order of the whole conversation
        try:
            whole = to_messages({"messages": prompt + answer}, "messages", system_prompt)
        except RowError as e:
            raise RowError(f"prompt + {side}: {e}") from None
        cut = len(whole) - len(answer)
        if whole[cut]["role"] != "assistant":
            raise RowError(f"{side}: the answer must start with an assistant turn")
        pair.setdefault("prompt", whole[:cut])
        pair[side] = whole[cut:]
    if pair["chosen"] == pair["rejected"]:
        raise RowError("chosen and rejected are the same")
    return pair


def normalize_pair(pair: dict[str, list[dict]], cfg) -> dict[str, list[dict]]:
    out = {}
    for key, messages in pair.items():
        out[key] = [
            {"role": m["role"], "content": normalize_text(m["content"], cfg)} for m in messages
        ]
        if not all(m["content"] for m in out[key]):
            raise RowError(f"{key}: empty content after normalization")
    return out


# ---------------------------------------------------------------- pairs -> token ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(pair: dict[str, list[dict]], tokenizer, max_seq_len: int) -> dict[str, list[int]]:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} as TRL's DPOTrainer tokenizes them: the
    prompt rendered with the generation prompt, each answer what the whole render adds after it
    (so an answer's end-of-turn token is learned), prompt first and both cut to max_seq_len."""

    def ids(messages, **kw) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = ids(pair["prompt"], add_generation_prompt=True)
    chosen = ids(pair["prompt"] + pair["chosen"])
    rejected = ids(pair["prompt"] + pair["rejected"])
    # where the prompt's render and the whole render's tokens part (a merge across the boundary)
    cut = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    if cut >= max_seq_len:
        raise RowError(f"the prompt fills max_seq_len={max_seq_len}; no answer token is left")
    room = max_seq_len - cut
    return {
        "prompt_ids": prompt[:cut],
        "chosen_ids": chosen[cut:][:room],
        "rejected_ids": rejected[cut:][:room],
    }


# ---------------------------------------------------------------- the job's data


def prepare_pairs(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    """The job's train/eval pairs from data.train_files / data.sources (a source's split, else a
    hash of the pair: the same pair always lands on the same side). A bad row is reported with
    file:line and counted, or stops the job with data.on_error=fail. Dedup and quality filters
    are SFT-only."""
    split_pairs, counts, errors = read_pairs(cfg, tokenizer, seed)
    digest = hashlib.sha256()
    for split in ("train", "eval"):
        counts[split] = len(split_pairs[split])
        for key, _ in split_pairs[split]:
            digest.update(f"{split}\t{key}\n".encode())
    digest.update(f"max_seq_len={cfg.max_seq_len}".encode())
    report = {"counts": counts, "errors": errors[:10], "prepared": "inline (preference pairs)"}
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    if not split_pairs["train"]:
        raise ConfigError(f"data: no usable preference pairs ({summary})")
    if not split_pairs["eval"]:
        raise ConfigError(
            f"data: the held-out set of pairs is empty ({summary}); give more rows, a larger "
            "data.eval_fraction or eval files"
        )
    return PreparedData(
        train=[ids for _, ids in split_pairs["train"]],
        eval=[ids for _, ids in split_pairs["eval"]],
        eval_conversations=[],
        dataset_hash="sha256:" + digest.hexdigest(),
        report=report,
    )


def read_pairs(cfg: DataConfig, tokenizer, seed: int):
    """({split: [(the pair's canonical text, its token ids)]}, counts, errors) over every
    source's rows; a test source's pairs are validated and left out."""

    def parse(row):
        pair = normalize_pair(to_pair(row, cfg.system_prompt), cfg.normalize)
        ids = tokenize_pair(pair, tokenizer, cfg.max_seq_len)
        return json.dumps(pair, sort_keys=True, ensure_ascii=False), ids

    return read_keyed_rows(cfg, seed, parse)


def read_keyed_rows(cfg: DataConfig, seed: int, parse: Callable[[Any], tuple[str, Any]]):
    """({split: [(key, example)]}, counts, errors) over every source's rows, `parse` making a
    row's canonical key and example (or raising RowError). A row goes to its source's split,
    else to the key's hash split; a test source's rows are validated and left out. A bad row is
    counted with file:line, or stops the job with data.on_error=fail. DPO's pairs and GRPO's
    prompts (jobs/data/prompts.py) are read this way."""
    splits: dict[str, list] = {"train": [], "eval": []}
    malformed = Drop.MALFORMED.count_name
    counts = {"input_rows": 0, malformed: 0, "train": 0, "eval": 0}
    errors: list[dict[str, str]] = []
    for index, source in enumerate(cfg.all_sources()):
        for file in expand_source(index, source):
            for where, row in read_rows(file):
                counts["input_rows"] += 1
                try:
                    if isinstance(row, RowError):
                        raise row
                    key, example = parse(row)
                except RowError as e:
                    if cfg.on_error == "fail":
                        raise ConfigError(f"{where}: {e} (data.on_error=fail)") from None
                    counts[malformed] += 1
                    errors.append({"where": where, "reason": str(e)})
                    continue
                if source.split in ("train", "eval"):
                    splits[source.split].append((key, example))
                elif source.split != "test":
                    splits[key_split(key, seed, cfg.eval_fraction)].append((key, example))
    return splits, counts, errors
