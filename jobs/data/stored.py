"""Stored examples: a job's token ids in Parquet on storage, read back row by row by the workers.

The driver writes each split once (SplitWriter) under the run's directory, RUN_DIR/data/tokens
(local or s3://: what every worker of a cluster can read), with tokens.json last: its presence
means the set is complete. A worker opens a split as a StoredSplit, an indexable sequence that
reads only the row groups holding the rows it is asked for. Nothing the size of the dataset
crosses Ray's object store, and a process holds a few row groups whatever the set's size.

Row groups hold about TARGET_GROUP_BYTES of ids: a step's examples lie anywhere in the epoch's
permutation, so a worker reads one group per example it trains on (benchmarks/stream_bench.py
measures the cost against reading the whole set).
"""

from __future__ import annotations

import hashlib
import json
import operator
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core import storage

FORMAT = 1  # bump when what a row holds changes: an older set is then written again
TARGET_GROUP_BYTES = 1 << 20
CACHED_GROUPS = 64  # decoded row groups a reader keeps (~64 MiB at most)
IDS = pa.list_(pa.int32())


def set_key(**fields: Any) -> str:
    """What a stored set was made from (dataset hash, tokenizer, data config...): a set on
    storage is used again only when its key is the same."""
    text = json.dumps({"format": FORMAT, **fields}, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _kind(values: list) -> str:
    """How a column is stored: token ids as int32 lists, ints and strings as they are, anything
    else (a grader's item, messages) as JSON text."""
    if all(isinstance(v, list) and all(type(x) is int for x in v) for v in values):
        return "ids"
    if all(type(v) is int for v in values):
        return "int"
    if all(isinstance(v, str) for v in values):
        return "str"
    return "json"


class SplitWriter:
    """Examples (dicts with the same keys) appended in order into one Parquet file at `url`, in
    row groups of equal row counts (a row's group is then its index // group_rows)."""

    def __init__(self, url: str):
        self.url, self.rows, self.group_rows = url, 0, 0
        self.pending: list[pa.Table] = []
        self.kinds: dict[str, str] = {}
        self.handle = self.writer = None

    def add(self, examples: list[dict]) -> None:
        if not examples:
            return
        if not self.kinds:
            self.kinds = {k: _kind([e[k] for e in examples]) for k in examples[0]}
        columns = {}
        for name, kind in self.kinds.items():
            values = [e[name] for e in examples]
            if kind == "json":
                columns[name] = pa.array([json.dumps(v, ensure_ascii=False) for v in values])
            else:
                columns[name] = pa.array(values, type={"ids": IDS, "int": pa.int64()}.get(kind))
        self.add_table(pa.table(columns))

    def add_table(self, table: pa.Table) -> None:
        """Rows already in Arrow (ids as list<int32>): how a benchmark writes gigabytes fast."""
        if not self.group_rows:
            self.group_rows = max(1, min(4096, TARGET_GROUP_BYTES * table.num_rows // table.nbytes))
            self.kinds = self.kinds or {f.name: _arrow_kind(f.type) for f in table.schema}
        self.pending.append(table)
        self.rows += table.num_rows
        buffered = pa.concat_tables(self.pending)
        whole = buffered.num_rows // self.group_rows * self.group_rows
        if whole:
            self._write(buffered.slice(0, whole))
        self.pending = [buffered.slice(whole)]

    def _write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.handle = storage.open_url(self.url, "wb").open()
            self.writer = pq.ParquetWriter(self.handle, table.schema, compression="zstd")
        self.writer.write_table(table, row_group_size=self.group_rows)

    def close(self) -> dict[str, Any]:
        """Writes the last, shorter group; returns what a StoredSplit needs to read the file."""
        rest = pa.concat_tables(self.pending) if self.pending else None
        if rest is not None and rest.num_rows:
            self._write(rest)
        if self.writer is not None:
            self.writer.close()
            self.handle.close()
        json_columns = [k for k, kind in self.kinds.items() if kind == "json"]
        return {"rows": self.rows, "group_rows": self.group_rows, "json_columns": json_columns}


def _arrow_kind(dtype: pa.DataType) -> str:
    if pa.types.is_list(dtype):
        return "ids"
    return "int" if pa.types.is_integer(dtype) else "str"


class StoredSplit(Sequence):
    """One stored split as a sequence: len() from metadata, [i], slices and iteration read the
    row groups they need. Pickled it is its URL and sizes; each process opens the file itself.
    `value` names the one column an item is (a split of conversations), else items are dicts."""

    def __init__(self, url: str, rows: int, group_rows: int, json_columns=(), value=None):
        self.url, self.rows, self.group_rows = url, rows, group_rows
        self.json_columns, self.value = tuple(json_columns), value
        self.__setstate__(self.__getstate__())

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._file, self._handle, self._lock = None, None, threading.Lock()
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"StoredSplit({self.url!r}, rows={self.rows})"

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.take(range(self.rows)[key])
        i = operator.index(key)
        if not -self.rows <= i < self.rows:
            raise IndexError(f"{self.url}: row {i} of {self.rows}")
        return self.take([i % self.rows])[0]

    def __iter__(self) -> Iterator:
        for group in range((self.rows + self.group_rows - 1) // max(self.group_rows, 1)):
            yield from self._items(self._group(group, keep=False))

    def take(self, indices: Iterable[int]) -> list:
        """The items at `indices`, in that order; each row group needed is read once."""
        indices = list(indices)
        wanted: dict[int, list[int]] = {}
        for pos, i in enumerate(indices):
            wanted.setdefault(i // self.group_rows, []).append(pos)
        out: list = [None] * len(indices)
        for group, positions in wanted.items():
            offsets = [indices[p] - group * self.group_rows for p in positions]
            rows = self._group(group).take(pa.array(offsets))
            for p, item in zip(positions, self._items(rows), strict=True):
                out[p] = item
        return out

    def _items(self, table: pa.Table) -> list:
        rows = table.to_pylist()
        for row in rows:
            for name in self.json_columns:
                row[name] = json.loads(row[name])
        return [row[self.value] for row in rows] if self.value else rows

    def _group(self, group: int, keep: bool = True) -> pa.Table:
        with self._lock:  # one file handle; a prefetching thread may read too
            if group in self._cache:
                self._cache.move_to_end(group)
                return self._cache[group]
            if self._file is None:
                self._handle = storage.open_url(self.url, "rb").open()
                self._file = pq.ParquetFile(self._handle)
            table = self._file.read_row_group(group)
            if keep:
                self._cache[group] = table
                while len(self._cache) > CACHED_GROUPS:
                    self._cache.popitem(last=False)
            return table


# ---------------------------------------------------------------- a set of splits


def split_url(directory: str, name: str) -> str:
    return storage.join(directory, f"{name}.parquet")


def write_meta(directory: str, meta: dict[str, Any]) -> None:
    """tokens.json, written after every split: a set with one is complete."""
    storage.write_text(storage.join(directory, "tokens.json"), json.dumps(meta, indent=1))


def read_meta(directory: str, key: str) -> dict[str, Any] | None:
    """tokens.json of the set at `directory` when it exists and was made with `key`."""
    url = storage.join(directory, "tokens.json")
    if not storage.exists(url):
        return None
    meta = json.loads(storage.read_text(url))
    return meta if meta.get("key") == key else None


def open_splits(directory: str, meta: dict[str, Any]) -> dict[str, StoredSplit]:
    """The splits tokens.json lists, each a StoredSplit (conversations: their messages)."""
    value = {"eval_conversations": "messages"}
    return {
        name: StoredSplit(split_url(directory, name), value=value.get(name), **info)
        for name, info in meta["splits"].items()
    }


def write_lists(directory: str, splits: dict[str, list[dict]]) -> dict[str, dict]:
    """Splits held in memory (DPO's pairs, GRPO's prompts) written in row groups of 1024."""
    infos = {}
    for name, rows in splits.items():
        writer = SplitWriter(split_url(directory, name))
        for start in range(0, len(rows), 1024):
            writer.add(rows[start : start + 1024])
        infos[name] = writer.close()
    return infos


def remove(directory: str) -> None:
    """The stored set, once the run that trained on it is complete."""
    fs, path = storage.filesystem(directory)
    if fs.exists(path):
        fs.rm(path, recursive=True)
