"""Deduplication: exact (content hash) and near-duplicate (MinHash + LSH banding).

Signatures come from datasketch's MinHash; the banding runs on a numpy array of all signatures
instead of datasketch's MinHashLSH, whose per-band Python dicts need several GB for a million rows
(measured in benchmarks/prepare_bench.py). Band collisions are candidate pairs; a pair is a near
duplicate when its estimated Jaccard similarity reaches the threshold. Groups are the connected
components of those pairs, and in each group the row with the lowest rank survives.
"""

from __future__ import annotations

import re

import numpy as np
import xxhash
from datasketch import MinHash

from core.upstream.datasketch import lsh_bands
from jobs.config import DedupConfig

PUNCTUATION = re.compile(r"[^\w\s]+")
SEED = 1  # the permutations must be the same in every process that signs rows


def shingles(text: str, kind: str, size: int) -> list[bytes]:
    """Word or character n-grams of the text, lower-cased and without punctuation (copies that
    differ only in case or punctuation are near duplicates, not different rows)."""
    text = " ".join(PUNCTUATION.sub(" ", text.lower()).split())
    if kind == "word":
        words = text.split(" ")
        grams = [" ".join(words[i : i + size]) for i in range(max(1, len(words) - size + 1))]
    else:
        grams = [text[i : i + size] for i in range(max(1, len(text) - size + 1))]
    return [g.encode("utf-8") for g in grams]


def signatures(texts: list[str], cfg: DedupConfig) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures (datasketch keeps them below 2**32)."""
    if not texts:
        return np.zeros((0, cfg.num_perm), dtype=np.uint32)
    sets = [shingles(t, cfg.shingle, cfg.shingle_size) for t in texts]
    hashes = MinHash.bulk(sets, num_perm=cfg.num_perm, seed=SEED, hashfunc=xxhash.xxh32_intdigest)
    return np.stack([m.hashvalues for m in hashes]).astype(np.uint32)


class UnionFind:
    """Groups whose root is always the member with the lowest rank."""

    def __init__(self, rank: np.ndarray):
        self.parent = np.arange(len(rank))
        self.rank = rank

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.rank[rb] < self.rank[ra]:
            ra, rb = rb, ra
        self.parent[rb] = ra

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def _collision_pairs(keys: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(head, member) pairs of rows sharing a key; head is the best-ranked row with that key."""
    order = np.lexsort((rank, keys))
    sorted_keys = keys[order]
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    head_pos = np.maximum.accumulate(np.where(starts, np.arange(len(keys)), 0))
    members = ~starts
    return order[head_pos[members]], order[members]


def exact_duplicate_of(keys: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For each row, the index of the row it duplicates exactly, or -1 when it is the survivor."""
    dup_of = np.full(len(keys), -1, dtype=np.int64)
    heads, members = _collision_pairs(keys, rank)
    dup_of[members] = heads
    return dup_of


def near_duplicate_of(
    sigs: np.ndarray, rank: np.ndarray, threshold: float, chunk: int = 1 << 16
) -> np.ndarray:
    """For each row, the survivor of its near-duplicate group (-1 for survivors and singletons)."""
    n, num_perm = sigs.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bands, rows = lsh_bands(threshold, num_perm)
    # A fixed odd multiplier per position folds a band into one uint64 key (collisions between
    # different bands' contents only add candidates, which the similarity check then rejects).
    mult = np.random.default_rng(0).integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
    heads, members = [], []
    with np.errstate(over="ignore"):
        for b in range(bands):
            block = sigs[:, b * rows : (b + 1) * rows].astype(np.uint64)
            keys = (block * mult).sum(axis=1, dtype=np.uint64)
            h, m = _collision_pairs(keys, rank)
            heads.append(h)
            members.append(m)
    heads, members = np.concatenate(heads), np.concatenate(members)
    pairs = np.unique(np.stack([heads, members], axis=1), axis=0) if len(heads) else heads
    uf = UnionFind(rank)
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        similarity = (sigs[part[:, 0]] == sigs[part[:, 1]]).mean(axis=1)
        for a, b in part[similarity >= threshold]:
            uf.union(int(a), int(b))
    roots = uf.roots()
    return np.where(roots == np.arange(n), -1, roots)
