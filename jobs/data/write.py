"""Stage 3: the kept rows into train/eval/test Parquet (each row as many times as its source's
weight says), every dropped row into dropped.jsonl with its reason, and the dataset hash."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from jobs.data.chunks import PLAIN_MESSAGES_TYPE
from jobs.data.decisions import Decision, column
from jobs.data.drops import KEPT, Drop, DroppedLog
from jobs.data.split import SPLITS

if TYPE_CHECKING:
    from jobs.data.prepare_config import PrepareConfig

OUTPUT_COLUMNS = ["messages", "text", "source", "where", "num_tokens", "score"]
TOOL_COLUMNS = [*OUTPUT_COLUMNS, "tools"]  # a set with tool-calling rows


class SplitFiles:
    """OUTPUT/{train,eval,test}.parquet, each opened at its first row, and the content hashes
    of the rows each received, in order (what the dataset hash covers)."""

    def __init__(self, output: str, with_tools: bool):
        self.output = output
        self.with_tools = with_tools
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.handles = []
        self.hashes: dict[str, list[bytes]] = {s: [] for s in SPLITS}
        self.rows = dict.fromkeys(SPLITS, 0)

    def write(self, name: str, table: pa.Table, hashes: np.ndarray) -> None:
        if self.with_tools:
            table = table.select(TOOL_COLUMNS)
        else:  # the same files as before tools existed
            table = table.select(OUTPUT_COLUMNS)
            table = table.set_column(0, "messages", table["messages"].cast(PLAIN_MESSAGES_TYPE))
        if name not in self.writers:
            url = storage.join(self.output, f"{name}.parquet")
            self.handles.append(storage.open_url(url, "wb").open())
            self.writers[name] = pq.ParquetWriter(self.handles[-1], table.schema)
        self.writers[name].write_table(table)
        self.hashes[name].append(hashes.tobytes())
        self.rows[name] += table.num_rows

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        for handle in self.handles:
            handle.close()


def write_splits(
    cfg: PrepareConfig, shards: list[Path], decision: Decision, dropped: DroppedLog, progress
):
    """Write the kept rows per split under cfg.output and log the dropped ones; returns the
    dataset hash and the rows written per split."""
    task = progress.add_task("write", total=len(decision.code))
    # duplicates name the row they duplicate
    where_all = column(shards, "where") if (decision.dup_of >= 0).any() else None
    files = SplitFiles(cfg.output, with_tools=any(_has_tools(path) for path in shards))
    offset = 0
    for path in shards:
        table = pq.read_table(path)
        rows = slice(offset, offset + table.num_rows)
        for i in np.flatnonzero(decision.code[rows] != KEPT):
            _log_drop(cfg, decision, table, i, offset + i, where_all, dropped)
        for name in SPLITS:
            kept = np.flatnonzero((decision.code[rows] == KEPT) & (decision.split[rows] == name))
            kept = np.repeat(kept, decision.repeats[rows][kept])
            if len(kept):
                files.write(name, table.take(pa.array(kept)), decision.hashes[offset + kept])
        offset += table.num_rows
        progress.update(task, advance=table.num_rows)
    files.close()
    digest = hashlib.sha256(_hashed_config(cfg).encode())
    for name in SPLITS:
        digest.update(f"\n{name}\n".encode())
        for chunk in files.hashes[name]:
            digest.update(chunk)
    return "sha256:" + digest.hexdigest(), files.rows


def _has_tools(shard: Path) -> bool:
    tools = pq.read_table(shard, columns=["tools"]).column("tools")
    return tools.null_count < len(tools)


def _log_drop(
    cfg: PrepareConfig, decision: Decision, table: pa.Table, i: int, row: int, where_all, dropped
):
    """Row `row` of all shards (`i` of this shard's `table`) into dropped.jsonl."""
    drop = Drop(int(decision.code[row]))
    tokens, length = decision.num_tokens[row], cfg.data.length
    if drop is Drop.EXACT:
        reason = "exact duplicate"
    elif drop is Drop.NEAR:
        reason = "near duplicate"
    elif drop is Drop.SHORT:
        reason = f"{tokens} tokens < data.length.min_tokens={length.min_tokens}"
    elif drop is Drop.LONG:
        reason = f"{tokens} tokens > data.length.max_tokens={length.max_tokens}"
    else:
        why = decision.reason.get(int(row)) or table.column("score_reason")[i].as_py()
        reason = f"quality {decision.score[row]:.2f} ({why})"
    dup = decision.dup_of[row]
    duplicate_of = where_all[int(dup)].as_py() if dup >= 0 else None
    dropped.write(table.column("where")[i].as_py(), drop, reason, duplicate_of)


def upload(local: Path, url: str) -> None:
    """A finished local file to url (a local path or s3://)."""
    with open(local, "rb") as src, storage.open_url(url, "wb") as dst:
        shutil.copyfileobj(src, dst)


def _hashed_config(cfg: PrepareConfig) -> str:
    """What the dataset hash covers besides the rows: how they were prepared, not where from."""
    data = cfg.data.model_dump(mode="json")
    for s in data["sources"]:
        s.pop("path")
    data.pop("train_files"), data.pop("eval_files"), data.pop("prepared")
    if data["quality"]["judge"]:
        data["quality"]["judge"].pop("api_key_env")
    return json.dumps({"data": data, "seed": cfg.seed}, sort_keys=True)
