"""Stage 1, row by row: read, validate, normalize, render with the chat template, count tokens,
score and sign (MinHash) every row, chunk by chunk into Parquet shards.

Chunks run in this process, or as Ray tasks when `workers` > 0, with at most 2 x workers in
flight: the driver holds one chunk of Python objects at a time and the work spreads over a
cluster's nodes. Malformed rows go to dropped.jsonl here; every later stage reads only the
shards' columns.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.config import ConfigError
from jobs.config import DataConfig
from jobs.data.dedup import signatures
from jobs.data.drops import Drop, DroppedLog, malformed_kind
from jobs.data.formats import to_example, turn_text
from jobs.data.normalize import example_key, normalize_example
from jobs.data.quality import heuristic_score
from jobs.data.render import render
from jobs.data.sources import RowError, SourceFile, read_rows

if TYPE_CHECKING:
    from jobs.data.prepare_config import PrepareConfig

log = logging.getLogger("rayft.prepare")

PLAIN_MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
# A turn's tool calls are stored as their JSON text; both tool fields are null without tools
# (and a prepared set without tools is written with PLAIN_MESSAGES_TYPE, as before tools).
MESSAGES_TYPE = pa.list_(
    pa.struct(
        [
            ("role", pa.string()),
            ("content", pa.string()),
            ("tool_calls", pa.string()),
            ("tool_call_id", pa.string()),
        ]
    )
)
Chunk = list[tuple[str, int, Any]]  # (where, source index, raw row)


@dataclass
class Shards:
    """What stage 1 leaves: Parquet shards of the rows that validated, in input order."""

    paths: list[Path] = field(default_factory=list)
    input_rows: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)  # per file: source, url, rows
    malformed: Counter[str] = field(default_factory=Counter)  # per kind of reason


@dataclass
class Kept:
    """A chunk's rows that validated, column by column."""

    where: list[str] = field(default_factory=list)
    source: list[int] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # as rendered for training


@functools.lru_cache(maxsize=2)
def cached_tokenizer(name: str):
    from inference.config import ModelConfig
    from inference.model import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=name))


def dedup_text(example: dict[str, Any]) -> str:
    """What near-dedup compares: the turns' text without system prompts, which a whole dataset
    shares and which would make every short row look like every other."""
    if "text" in example:
        return example["text"]
    return "\n".join(turn_text(m) for m in example["messages"] if m["role"] != "system")


def stored_messages(example: dict[str, Any]) -> list[dict] | None:
    """An example's messages as the Parquet column holds them (MESSAGES_TYPE)."""
    if "messages" not in example:
        return None
    return [
        {**m, "tool_calls": json.dumps(m["tool_calls"], ensure_ascii=False)}
        if "tool_calls" in m
        else m
        for m in example["messages"]
    ]


def stored_tools(example: dict[str, Any]) -> str | None:
    return json.dumps(example["tools"], ensure_ascii=False) if "tools" in example else None


def example_from_columns(messages: list[dict] | None, text: str | None, tools: str | None):
    """The example a stored row was made from (stored_messages, stored_tools read back)."""
    if messages is None:
        return {"text": text}
    turns = []
    for m in messages:
        turn = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls") is not None:
            turn["tool_calls"] = json.loads(m["tool_calls"])
        if m.get("tool_call_id") is not None:
            turn["tool_call_id"] = m["tool_call_id"]
        turns.append(turn)
    if tools is None:
        return {"messages": turns}
    return {"messages": turns, "tools": json.loads(tools)}


def read_examples(table: pa.Table) -> list[dict[str, Any]]:
    """The examples of a table of stored rows (a shard, or a split of a prepared set; one
    written before tools existed has no tools column)."""
    messages, texts = table.column("messages").to_pylist(), table.column("text").to_pylist()
    names = table.column_names
    tools = table.column("tools").to_pylist() if "tools" in names else [None] * len(texts)
    return [example_from_columns(*row) for row in zip(messages, texts, tools, strict=True)]


def process_chunk(
    rows: Chunk, cfg: DataConfig, tokenizer
) -> tuple[pa.Table, list[tuple[str, str]]]:
    """Validate, normalize, render and sign one chunk: its table and its (where, reason) errors."""
    if isinstance(tokenizer, str):
        tokenizer = cached_tokenizer(tokenizer)
    kept, errors = validate_chunk(rows, cfg, tokenizer)
    return chunk_table(kept, cfg, tokenizer), errors


def validate_chunk(rows: Chunk, cfg: DataConfig, tokenizer) -> tuple[Kept, list[tuple[str, str]]]:
    sources = cfg.all_sources()
    kept, errors = Kept(), []
    for where, source, row in rows:
        src = sources[source]
        try:
            if isinstance(row, RowError):
                raise row
            example = to_example(row, src.format, cfg.system_prompt, src.fields)
            example = normalize_example(example, cfg.normalize)
            text = render(example, tokenizer)
        except RowError as e:
            if cfg.on_error == "fail":
                raise ConfigError(f"{where}: {e} (data.on_error=fail)") from None
            errors.append((where, str(e)))
            continue
        kept.where.append(where)
        kept.source.append(source)
        kept.examples.append(example)
        kept.texts.append(text)
    return kept, errors


def chunk_table(kept: Kept, cfg: DataConfig, tokenizer) -> pa.Table:
    """The shard's columns: the example, its token count, quality score, content hash and
    MinHash signature."""
    n = len(kept.examples)
    num_tokens = []
    if n:
        ids = tokenizer(kept.texts, add_special_tokens=False, verbose=False)["input_ids"]
        num_tokens = [len(i) for i in ids]
    if cfg.quality.scorer == "heuristic":
        scores = [heuristic_score(e) for e in kept.examples]
    else:
        scores = [(1.0, "") for _ in kept.examples]
    hashes = [
        hashlib.blake2b(example_key(e).encode(), digest_size=16).digest() for e in kept.examples
    ]
    if cfg.dedup.near:
        sigs = signatures([dedup_text(e) for e in kept.examples], cfg.dedup)
    else:
        sigs = np.zeros((n, 0), np.uint32)
    return pa.table(
        {
            "where": pa.array(kept.where, pa.string()),
            "source": pa.array(kept.source, pa.int32()),
            "messages": pa.array([stored_messages(e) for e in kept.examples], MESSAGES_TYPE),
            "text": pa.array([e.get("text") for e in kept.examples], pa.string()),
            "tools": pa.array([stored_tools(e) for e in kept.examples], pa.string()),
            "num_tokens": pa.array(num_tokens, pa.int32()),
            "score": pa.array([s for s, _ in scores], pa.float32()),
            "score_reason": pa.array([r for _, r in scores], pa.string()),
            "content_hash": pa.array(hashes, pa.binary(16)),
            "signature": _signature_column(sigs),
        }
    )


def _signature_column(sigs: np.ndarray) -> pa.Array:
    if not sigs.shape[1]:  # near dedup off: a null per row
        return pa.nulls(len(sigs), pa.list_(pa.uint32(), 1))
    return pa.FixedSizeListArray.from_arrays(pa.array(sigs.ravel(), pa.uint32()), sigs.shape[1])


def iter_chunks(files: list[SourceFile], size: int, shards: Shards) -> Iterator[Chunk]:
    """Every file's rows in chunks of `size`; counts input rows per file into `shards`."""
    chunk = []
    for file in files:
        rows_before = shards.input_rows
        for where, row in read_rows(file):
            chunk.append((where, file.source, row))
            shards.input_rows += 1
            if len(chunk) == size:
                yield chunk
                chunk = []
        rows = shards.input_rows - rows_before
        shards.files.append({"source": file.source, "url": file.url, "rows": rows})
    if chunk:
        yield chunk


def read_chunks(
    cfg: PrepareConfig,
    files: list[SourceFile],
    tokenizer,
    work: Path,
    dropped: DroppedLog,
    progress,
) -> Shards:
    """Stage 1 over every file: shards under `work`, malformed rows logged to `dropped`."""
    shards = Shards()
    task = progress.add_task("read, validate, render, sign", total=None)

    def finish(index: int, table: pa.Table, errors: list[tuple[str, str]]) -> None:
        path = work / f"shard-{index:06d}.parquet"
        pq.write_table(table, path)
        shards.paths.append(path)
        for where, reason in errors:
            shards.malformed[malformed_kind(reason)] += 1
            dropped.write(where, Drop.MALFORMED, reason)
        progress.update(task, advance=table.num_rows + len(errors))
        if not progress.console.is_terminal and len(shards.paths) % 50 == 0:
            log.info("read, validate, render, sign: %d rows", shards.input_rows)  # for job logs

    chunks = iter_chunks(files, cfg.chunk_rows, shards)
    if cfg.workers == 0:
        for index, chunk in enumerate(chunks):
            finish(index, *process_chunk(chunk, cfg.data, tokenizer))
    else:
        _on_ray(chunks, cfg, finish)
    shards.paths.sort()
    progress.update(task, total=shards.input_rows, completed=shards.input_rows)
    return shards


def _on_ray(chunks: Iterator[Chunk], cfg: PrepareConfig, finish) -> None:
    """process_chunk as Ray tasks, at most 2 x workers in flight: the driver never holds the
    whole input."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=2)(process_chunk)
    data_ref = ray.put(cfg.data)
    pending: dict[Any, int] = {}
    for index, chunk in enumerate(chunks):
        pending[remote.remote(chunk, data_ref, cfg.tokenizer)] = index
        while len(pending) >= 2 * cfg.workers:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            finish(pending.pop(ref), *_get(ref))
    for ref in list(pending):
        finish(pending.pop(ref), *_get(ref))


def _get(ref):
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ConfigError):  # on_error=fail inside a worker
            raise e.cause from None
        raise
