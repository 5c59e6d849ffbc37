"""The hash split and source weights: where a row goes from its content alone, so a row keeps its
split as rows are added, and how many copies of it train sees."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import xxhash

from jobs.config import SourceConfig

SPLITS = ("train", "eval", "test")


def unit_interval(hashes: np.ndarray, seed: int) -> np.ndarray:
    """A number in [0, 1) per row from its content hash and a seed: the same row, the same number."""
    key = np.uint64(xxhash.xxh64_intdigest(str(seed).encode()))
    with np.errstate(over="ignore"):  # splitmix64's finalizer: wrap-around is the point
        x = hashes[:, 1] ^ key
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def hash_split(hashes: np.ndarray, seed: int, eval_fraction: float, test_fraction: float):
    """'train', 'eval' or 'test' per row of (n, 2) uint64 content hashes."""
    u = unit_interval(hashes, seed)
    test_or_train = np.where(u < eval_fraction + test_fraction, "test", "train")
    return np.where(u < eval_fraction, "eval", test_or_train)


def assign_splits(
    hashes: np.ndarray,
    source: np.ndarray,
    sources: list[SourceConfig],
    seed: int,
    eval_fraction: float,
    test_fraction: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(split, repeats) per row: its source's split, else the hash split; and how many copies of
    it train holds: a source's weight 1.5 keeps every row once and half of them twice (by hash),
    0.5 keeps half. Rows outside train are never repeated."""
    n = len(source)
    fixed = np.array([s.split for s in sources])
    split = hash_split(hashes, seed, eval_fraction, test_fraction)
    split = np.where(fixed[source] == "auto", split, fixed[source]) if n else split
    weight = np.array([s.weight for s in sources])[source] if n else np.zeros(0)
    frac = unit_interval(hashes, seed + 1)
    repeats = np.floor(weight).astype(np.int64) + (frac < weight - np.floor(weight))
    return split, np.where(split == "train", repeats, 1)


def key_split(key: str, seed: int, eval_fraction: float) -> str:
    """'train' or 'eval' for one preference pair from its canonical text."""
    u = random.Random(hashlib.sha256(f"{seed}:{key}".encode()).digest()).random()
    return "eval" if u < eval_fraction else "train"
