"""manifest.json: what a prepared set holds and how it was made (counts per stage, files, sources
with their hashes, the config, the dataset hash), and reading a prepared set back."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from core.config import ConfigError
from jobs.data.chunks import Shards, read_examples
from jobs.data.decisions import Decision
from jobs.data.drops import DECIDED, KEPT, Drop
from jobs.data.sources import file_sha256
from jobs.data.split import SPLITS

if TYPE_CHECKING:
    from jobs.data.prepare_config import PrepareConfig


@dataclass
class Manifest:
    data: dict[str, Any]
    path: str

    @property
    def dataset_hash(self) -> str:
        return self.data["dataset_hash"]

    @property
    def counts(self) -> dict[str, int]:
        return self.data["counts"]


def manifest_entries(
    cfg: PrepareConfig,
    dataset_hash: str,
    counts: dict[str, Any],
    errors,
    shards: Shards,
    start: float,
) -> dict[str, Any]:
    """manifest.json's contents, for a preparation that began at `start`."""
    return {
        "dataset_hash": dataset_hash,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": cfg.tokenizer,
        "counts": counts,
        "files": {s: f"{s}.parquet" for s in SPLITS if counts[s]},
        "dropped_file": "dropped.jsonl",
        "errors": errors,
        "sources": _source_entries(cfg, shards.files),
        "config": json.loads(cfg.model_dump_json()),
        "seconds": round(time.time() - start, 2),
    }


def count_rows(shards: Shards, decision: Decision, written: dict[str, int]) -> dict[str, Any]:
    """The manifest's counts: input rows, each drop reason, rows per split (after weighting),
    malformed rows per kind, and what dedup and weighting did to train."""
    counts: dict[str, Any] = {"input_rows": shards.input_rows}
    counts[Drop.MALFORMED.count_name] = sum(shards.malformed.values())
    for drop in DECIDED:
        counts[drop.count_name] = int((decision.code == drop).sum())
    counts.update(written)
    counts["malformed_by_reason"] = dict(shards.malformed)
    return {**counts, **_train_counts(decision)}


def _train_counts(decision: Decision) -> dict[str, int]:
    code, split, dup_of = decision.code, decision.split, decision.dup_of
    dups = np.flatnonzero(dup_of >= 0)
    # a duplicate of a held-out row that would otherwise have gone to train: leakage prevented
    leaked = 0
    if len(dups):
        leaked = int(((split[dup_of[dups]] != "train") & (split[dups] == "train")).sum())
    kept = code == KEPT
    train_keys = decision.hashes[kept & (split == "train"), 0]
    held_keys = decision.hashes[kept & (split != "train"), 0]
    return {
        "train_unique": int((kept & (split == "train")).sum()),
        "weighted_out": int((kept & (split == "train") & (decision.repeats == 0)).sum()),
        "leakage_prevented": leaked,
        "train_eval_overlap": int(len(np.intersect1d(train_keys, held_keys))),
    }


def check_accounted(counts: dict[str, int]) -> None:
    """Every input row is in exactly one place: a split (before weighting) or a drop count."""
    placed = counts["train_unique"] + counts["eval"] + counts["test"]
    dropped = sum(counts[drop.count_name] for drop in Drop)
    if placed + dropped != counts["input_rows"]:
        raise RuntimeError(f"rows unaccounted for: {counts}")  # a bug, never bad input


def _source_entries(cfg: PrepareConfig, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    entries = []
    for i, s in enumerate(cfg.data.all_sources()):
        mine = [
            {"url": f["url"], "rows": f["rows"], "sha256": file_sha256(f["url"])}
            for f in files
            if f["source"] == i
        ]
        entries.append({**s.model_dump(mode="json"), "files": mine})
    return entries


def summary(manifest: dict[str, Any]) -> str:
    """The non-zero counts and the first errors, for an error message."""
    c = manifest["counts"]
    parts = [f"{k} {v}" for k, v in c.items() if isinstance(v, int) and v]
    errors = "; ".join(f"{e['where']}: {e['reason']}" for e in manifest["errors"][:3])
    return ", ".join(parts) + (f"; e.g. {errors}" if errors else "")


# ---------------------------------------------------------------- reading a prepared set


def read_manifest(path: str) -> dict[str, Any]:
    url = storage.join(path, "manifest.json")
    if not storage.exists(url):
        raise ConfigError(
            f"data.prepared: {path} has no manifest.json (write it with python -m jobs.prepare)"
        )
    with storage.open_url(url) as f:
        return json.load(f)


def read_split(path: str, name: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, example) rows of one split of a prepared set; [] when the split is empty."""
    return [row for batch in read_split_batches(path, name) for row in batch]


def read_split_batches(
    path: str, name: str, rows: int = 1024
) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """One split of a prepared set, `rows` (where, example) rows at a time: a reader holds one
    batch, whatever the split's size."""
    manifest = read_manifest(path)
    if name not in manifest["files"]:
        return
    with storage.open_url(storage.join(path, manifest["files"][name])) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=rows):
            table = pa.Table.from_batches([batch])
            yield list(zip(table.column("where").to_pylist(), read_examples(table), strict=True))
