"""Data preparation benchmark: rows/s and peak memory of the whole pipeline on a generated set,
and near-duplicate recall/precision against known near-duplicates.

    python benchmarks/prepare_bench.py --rows 1000000            # a million rows (minutes)
    python benchmarks/prepare_bench.py --rows 50000 --workers 2  # chunks on 2 Ray workers
    python benchmarks/prepare_bench.py --rows 200 --dedup-docs 200 --tokenizer DIR  # seconds: a smoke run

Baselines in the same run: reading + JSON-parsing the file alone (the I/O floor: pipeline rows/s
as a ratio of it), and datasketch's MinHashLSH on the same signatures (time and memory of our
numpy banding as a ratio of it, and their agreement).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from jobs.config import DataConfig, DedupConfig
from jobs.data.dedup import lsh_bands, near_duplicate_of, signatures
from jobs.data.prepare import PrepareConfig, prepare
from jobs.data.sources import SourceFile, read_rows

WORDS = [f"w{i}" for i in range(5000)]
SHOWN_COUNTS = (
    "input_rows",
    "malformed",
    "exact_duplicates",
    "near_duplicates",
    "too_short",
    "low_quality",
    "train",
    "eval",
)


def doc(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def perturb(rng: random.Random, text: str, edits: int) -> str:
    words = text.split()
    for _ in range(edits):
        words[rng.randrange(len(words))] = rng.choice(WORDS)
    return " ".join(words)


def write_dataset(path: Path, rows: int, seed: int = 0) -> None:
    """Chat rows with 1% exact copies, 1% near copies (1 word changed) and 0.5% malformed lines."""
    rng = random.Random(seed)
    recent: list[tuple[str, str]] = []
    with open(path, "w") as f:
        for _ in range(rows):
            roll = rng.random()
            if roll < 0.005:
                f.write('{"messages": [{"role": "user", "content": "cut off\n')
                continue
            if roll < 0.015 and recent:
                q, a = rng.choice(recent)
            elif roll < 0.025 and recent:
                q, a = rng.choice(recent)
                a = perturb(rng, a, 1)
            else:
                q, a = doc(rng, 20), doc(rng, 60)
                recent = (recent + [(q, a)])[-1000:]
            row = {
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            }
            f.write(json.dumps(row) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_pipeline(rows: int, workers: int, tokenizer: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        t0 = time.perf_counter()
        write_dataset(path, rows)
        print(
            f"generated {rows:,} rows ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s"
        )

        t0 = time.perf_counter()
        n = sum(1 for _ in read_rows(SourceFile(0, str(path), "jsonl")))
        read_s = time.perf_counter() - t0
        rss_before = peak_rss_mb()

        data = DataConfig(train_files=[str(path)], length={"min_tokens": 16})
        cfg = PrepareConfig(
            data=data,
            tokenizer=tokenizer,
            output=str(Path(tmp) / "out"),
            workers=workers,
            chunk_rows=5000,
        )
        if workers:
            from core.ray_cluster import start_local_ray

            start_local_ray(num_cpus=workers)  # workers at normal priority, as jobs.prepare does
        t0 = time.perf_counter()
        manifest = prepare(cfg, show_progress=True)
        prep_s = time.perf_counter() - t0
        c = manifest.counts
        print(
            f"\npipeline, {workers or 'no'} Ray workers: {n:,} rows in {prep_s:.1f} s = {n / prep_s:,.0f} rows/s"
        )
        print(
            f"read + parse only (baseline): {n / read_s:,.0f} rows/s; pipeline / baseline = {read_s / prep_s:.3f}"
        )
        print(
            f"driver peak RSS {peak_rss_mb():,.0f} MiB (after reading alone: {rss_before:,.0f} MiB)"
        )
        print("counts: " + ", ".join(f"{k} {c[k]:,}" for k in SHOWN_COUNTS))


def bench_near_dedup(base: int, copies: int, edits: int, threshold: float) -> None:
    """Known near-duplicates: `copies` docs are `base` docs with `edits` words changed."""
    rng = random.Random(1)
    originals = [doc(rng, 80) for _ in range(base)]
    sources = rng.sample(range(base), copies)
    texts = originals + [perturb(rng, originals[s], edits) for s in sources]
    cfg = DedupConfig(threshold=threshold, shingle="word", shingle_size=3)
    t0 = time.perf_counter()
    sigs = signatures(texts, cfg)
    sign_s = time.perf_counter() - t0
    rank = np.arange(len(texts))

    tracemalloc.start()
    t0 = time.perf_counter()
    dup_of = near_duplicate_of(sigs, rank, threshold)
    ours_s = time.perf_counter() - t0
    ours_mem = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()

    truth = {base + i: s for i, s in enumerate(sources)}
    found = {i: int(d) for i, d in enumerate(dup_of) if d >= 0}
    true_pos = sum(1 for i, d in found.items() if truth.get(i) == d)
    recall, precision = true_pos / len(truth), true_pos / max(1, len(found))

    from datasketch import MinHash, MinHashLSH

    b, r = lsh_bands(threshold, cfg.num_perm)
    tracemalloc.start()
    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=cfg.num_perm)
    theirs = 0  # its usual use: query, then insert what has no candidate (no similarity check)
    for i, sig in enumerate(sigs):
        m = MinHash(num_perm=cfg.num_perm, hashvalues=sig.astype(np.uint64), scheme="affine32")
        if lsh.query(m):
            theirs += 1
        else:
            lsh.insert(i, m)
    lib_s = time.perf_counter() - t0
    lib_mem = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    print(
        f"\nnear dedup: {len(texts):,} docs, {copies:,} known near copies ({edits} of 80 words changed), threshold {threshold}, {b} bands x {r} rows"
    )
    print(f"  signatures {len(texts) / sign_s:,.0f} docs/s")
    print(f"  recall {recall:.3f}  precision {precision:.3f}  (found {len(found):,})")
    print(
        f"  numpy banding {ours_s:.2f} s, {ours_mem:.0f} MiB peak  vs  datasketch MinHashLSH {lib_s:.2f} s, {lib_mem:.0f} MiB peak"
    )
    print(
        f"  ratio: time {ours_s / lib_s:.3f}, memory {ours_mem / lib_mem:.3f}; duplicates flagged: ours {len(found):,}, MinHashLSH {theirs:,}"
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows through the pipeline")
    ap.add_argument("--workers", type=int, default=0, help="Ray workers (0: in this process)")
    ap.add_argument(
        "--tokenizer",
        default=".cache/tiny-llama",
        help="model directory (python -m jobs.tiny_model)",
    )
    ap.add_argument(
        "--dedup-docs", type=int, default=50_000, help="documents of the near-dedup measurement"
    )
    args = ap.parse_args()
    bench_near_dedup(args.dedup_docs, args.dedup_docs // 10, edits=2, threshold=0.7)
    bench_pipeline(args.rows, args.workers, args.tokenizer)


if __name__ == "__main__":
    main()
