"""Stage 2, on arrays: which rows are dropped and why, which row each duplicate repeats, each
kept row's split and its copies in train. Only numpy arrays of the shards' hashes, signatures,
token counts and scores are held, never the rows themselves (the LLM judge excepted, which reads
the rows it grades).

Exact duplicates, then near duplicates, over all splits together: a row from an eval/test source
wins its group, so no copy of a held-out row stays in train. Then the length filter and the
quality filter, then the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.config import DataConfig, LengthConfig, QualityConfig
from jobs.data.chunks import read_examples
from jobs.data.dedup import exact_duplicate_of, near_duplicate_of
from jobs.data.drops import KEPT, Drop
from jobs.data.quality import JudgeScorer
from jobs.data.split import assign_splits

if TYPE_CHECKING:
    from jobs.data.prepare_config import PrepareConfig


@dataclass
class Decision:
    """Per row of the shards (in their order), what happens to it."""

    code: np.ndarray  # int8: the Drop that applies, or KEPT
    dup_of: np.ndarray  # int64: the row a duplicate repeats, else -1
    split: np.ndarray  # train / eval / test
    repeats: np.ndarray  # int64: copies in train (the source's weight)
    hashes: np.ndarray  # (n, 2) uint64: the content hash
    num_tokens: np.ndarray
    score: np.ndarray  # float64: quality, 1 when not scored
    reason: dict[int, str]  # row -> why the judge scored it low (the heuristic's is on disk)


def column(shards: list[Path], name: str) -> pa.Array:
    """One column of all shards, as one array."""
    if not shards:
        return pa.array([])
    tables = [pq.read_table(p, columns=[name]).column(name).combine_chunks() for p in shards]
    return pa.concat_arrays(tables)


def decide(cfg: PrepareConfig, shards: list[Path], progress) -> Decision:
    """Stage 2, over the shards of stage 1."""
    data = cfg.data
    task = progress.add_task("dedup, filter, split", total=5)
    source = column(shards, "source").to_numpy(zero_copy_only=False).astype(np.int32)
    n = len(source)
    hashes = np.frombuffer(column(shards, "content_hash").buffers()[1], dtype=np.uint64)[: 2 * n]
    hashes = hashes.reshape(n, 2) if n else np.zeros((0, 2), np.uint64)
    num_tokens = column(shards, "num_tokens").to_numpy(zero_copy_only=False)
    rank = _rank(source, data)
    code = np.full(n, KEPT, np.int8)

    dup_of = np.full(n, -1, np.int64)
    if data.dedup.exact:
        dup_of = exact_duplicate_of(hashes[:, 0], rank)
        code[dup_of >= 0] = Drop.EXACT
    progress.advance(task)
    if data.dedup.near and n:
        _mark_near_duplicates(code, dup_of, shards, rank, data)
    progress.advance(task)
    _mark_length(code, num_tokens, data.length)
    progress.advance(task)
    score = column(shards, "score").to_numpy(zero_copy_only=False).astype(np.float64)
    reason = _mark_quality(code, score, rank, shards, data.quality)
    progress.advance(task)
    split, repeats = assign_splits(
        hashes, source, data.all_sources(), cfg.seed, data.eval_fraction, data.test_fraction
    )
    progress.advance(task)
    return Decision(code, dup_of, split, repeats, hashes, num_tokens, score, reason)


def _rank(source: np.ndarray, data: DataConfig) -> np.ndarray:
    """Who wins a duplicate group (lowest first): held-out rows, then earlier rows."""
    n = len(source)
    fixed = np.array([s.split for s in data.all_sources()])
    held_out = np.isin(fixed[source], ["eval", "test"]) if n else np.zeros(0, bool)
    return np.where(held_out, 0, n) + np.arange(n, dtype=np.int64)


def _mark_near_duplicates(code, dup_of, shards: list[Path], rank, data: DataConfig) -> None:
    """MinHash near duplicates among the rows no exact duplicate took."""
    alive = np.flatnonzero(code == KEPT)
    sigs = column(shards, "signature").flatten().to_numpy()
    sigs = sigs.reshape(len(code), data.dedup.num_perm)
    near = near_duplicate_of(sigs[alive], rank[alive], data.dedup.threshold)
    hit = near >= 0
    code[alive[hit]] = Drop.NEAR
    dup_of[alive[hit]] = alive[near[hit]]


def _mark_length(code, num_tokens, length: LengthConfig) -> None:
    alive = code == KEPT
    code[alive & (num_tokens < length.min_tokens)] = Drop.SHORT
    code[alive & (num_tokens > length.max_tokens)] = Drop.LONG


def _mark_quality(code, score, rank, shards, quality: QualityConfig) -> dict[int, str]:
    """Drops rows below quality.min_score, then the lowest drop_bottom_fraction of the rest
    (lowest score, then latest, first); the judge grades the surviving rows first. Returns the
    judge's reasons by row."""
    reason: dict[int, str] = {}
    if quality.scorer == "none":
        return reason
    alive = np.flatnonzero(code == KEPT)
    if quality.scorer == "judge" and len(alive):
        graded = JudgeScorer(quality.judge).score(_examples(shards, alive))
        score[alive] = [s for s, _ in graded]
        reason.update(zip(alive.tolist(), [r for _, r in graded], strict=True))
    if quality.min_score is not None:
        code[alive[score[alive] < quality.min_score]] = Drop.LOW
    alive = np.flatnonzero(code == KEPT)
    n_bottom = int(quality.drop_bottom_fraction * len(alive))
    if n_bottom:
        order = np.lexsort((rank[alive], score[alive]))
        code[alive[order[:n_bottom]]] = Drop.LOW
    return reason


def _examples(shards: list[Path], indices: np.ndarray) -> list[dict[str, Any]]:
    """The rows at `indices`, as examples (for the judge)."""
    columns = ["messages", "text", "tools"]
    table = pa.concat_tables(pq.read_table(p, columns=columns) for p in shards)
    return read_examples(table.take(pa.array(indices)))
