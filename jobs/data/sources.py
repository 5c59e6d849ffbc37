"""Data sources: expand a path (file, glob, directory, s3://, saved `datasets` dataset) into files,
and read each file's rows with their location, without holding a whole file in memory.

A row comes out as (where, value): `where` is what an error message names ("data/a.jsonl:17",
"data/b.csv:row 5", "data/c.parquet:row 12"); value is a dict, or a RowError for a row that
could not even be parsed (invalid JSON, invalid UTF-8).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from core.config import ConfigError
from core.storage import filesystem, is_remote, open_url, protocol
from jobs.config import SourceConfig

KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
BATCH_ROWS = 4096  # rows per Arrow batch read from Parquet/CSV/datasets


class RowError(ValueError):
    """A row that cannot become a training example; the message is the reason."""


@dataclass(frozen=True)
class SourceFile:
    source: int  # index into the data config's sources
    url: str  # as given to fsspec (local path or s3://…)
    kind: str  # jsonl | json | parquet | csv | arrow (a saved datasets dataset)


def file_kind(name: str) -> str | None:
    for ext in COMPRESSIONS:
        name = name.removesuffix(ext)
    return KINDS.get(os.path.splitext(name)[1].lower())


def expand_source(index: int, source: SourceConfig) -> list[SourceFile]:
    """The readable files a source names, sorted; an error names the source when there are none."""
    where = f"data.sources[{index}].path ({source.path})"
    try:
        fs, root = filesystem(source.path)
        scheme = protocol(source.path)
        if fs.isdir(root) and fs.exists(f"{root}/dataset_info.json"):
            arrows = sorted(p for p in fs.find(root) if p.endswith(".arrow"))
            return [SourceFile(index, _display(scheme + p), "arrow") for p in arrows]
        if fs.isdir(root):
            candidates = fs.find(root)
        elif any(ch in root for ch in "*?["):
            candidates = fs.glob(root)
        elif fs.isfile(root):
            candidates = [root]
        else:
            raise ConfigError(f"{where}: not found")
    except (OSError, PermissionError) as e:  # s3fs maps auth and network errors to OSError
        raise ConfigError(f"{where}: cannot read: {type(e).__name__}: {e}") from None
    files = [
        SourceFile(index, _display(scheme + p), file_kind(p))
        for p in sorted(candidates)
        if file_kind(p)
    ]
    if not files:
        raise ConfigError(
            f"{where}: no .jsonl/.json/.parquet/.csv files (optionally .gz/.bz2/.xz/.zst) found"
        )
    return files


def _display(url: str) -> str:
    """Local files under the working directory keep a relative path: shorter, portable errors."""
    if is_remote(url):
        return url
    rel = os.path.relpath(url)
    return url if rel.startswith("..") else rel


def file_sha256(url: str) -> str:
    """Content hash of a file's bytes: a source's identity in the manifest."""
    h = hashlib.sha256()
    with open_url(url, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def read_rows(file: SourceFile) -> Iterator[tuple[str, Any]]:
    """Yield (where, row dict or RowError) for every row of one file, streaming."""
    name = file.url
    if file.kind == "jsonl":
        with open_url(file.url, "rb", compression="infer") as f:
            yield from _jsonl_rows(f, name)
    elif file.kind == "json":
        # A JSON array (or {"data": [...]}) has to be parsed whole; such files are small exports.
        with open_url(file.url, "rb", compression="infer") as f:
            raw = f.read()
        try:
            doc = json.loads(raw.decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            yield f"{name}", RowError(f"invalid UTF-8 at byte {e.start}")
            return
        except json.JSONDecodeError as e:
            yield f"{name}:{e.lineno}", RowError(f"invalid JSON ({e.msg} at column {e.colno})")
            return
        rows = (
            doc.get("data") if isinstance(doc, dict) and isinstance(doc.get("data"), list) else doc
        )
        if not isinstance(rows, list):
            yield name, RowError('expected a JSON array of rows (or {"data": [...]})')
            return
        for i, row in enumerate(rows):
            yield f"{name}:[{i}]", row
    elif file.kind == "parquet":
        with open_url(file.url, "rb") as f:
            yield from _arrow_batches_rows(pq.ParquetFile(f).iter_batches(BATCH_ROWS), name, 0)
    elif file.kind == "csv":
        with open_url(file.url, "rb", compression="infer") as f:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(block_size=1 << 22),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
            )
            # the header is line 1, so row i sits on line i + 2 (no multi-line cells assumed)
            yield from _arrow_batches_rows(reader, name, 2, unit="line")
    elif file.kind == "arrow":
        import pyarrow as pa

        with open_url(file.url, "rb") as f:
            reader = pa.ipc.open_stream(f)
            yield from _arrow_batches_rows(reader, name, 0)
    else:  # pragma: no cover - expand_source only yields known kinds
        raise ConfigError(f"{name}: unsupported file type")


def _jsonl_rows(f, name: str) -> Iterator[tuple[str, Any]]:
    for line_no, raw in enumerate(f, start=1):
        where = f"{name}:{line_no}"
        try:
            # a byte-order mark some editors put at the start of a file is not part of row 1
            text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as e:
            yield where, RowError(f"invalid UTF-8 at byte {e.start}")
            continue
        if not text.strip():
            continue
        try:
            yield where, json.loads(text.rstrip("\r\n"))  # error columns within the line
        except json.JSONDecodeError as e:
            yield where, RowError(f"invalid JSON ({e.msg} at column {e.colno})")


def _arrow_batches_rows(batches, name: str, first: int, unit: str = "row"):
    n = first
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{name}:{unit} {n}", row
            n += 1
