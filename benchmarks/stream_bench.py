"""Data that streams: driver and worker memory of a job do not grow with its dataset.

    python benchmarks/stream_bench.py                  # 1 GB and 4 GB of token ids, 2 rounds
    python benchmarks/stream_bench.py --sizes-gb 0.002 --rounds 1 --steps 1 --local   # CI smoke

For each size it writes a synthetic prepared set of token ids straight in the stored format
(jobs/data/stored.py), then runs the real job on it (the tiny model, one Ray Train worker, a few
steps) in a fresh driver process, rounds interleaved over the sizes. It prints the driver's and
the worker's peak RSS per size and their ratio to the smallest size, then the reader choice:
the time to read a step's examples from a fresh reader (what the first step waits for) against
reading the whole split, for Parquet row groups (the job's reader) and Arrow IPC record batches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.data import stored  # noqa: E402

ROW_TOKENS = 512  # tokens per row: 4 KiB of ids (input_ids + labels) a row
STEP = 16  # examples a step reads


def job_overrides(model: str, root: Path, name: str, steps: int, local: bool) -> list[str]:
    return [
        f"model.name_or_path={model}",
        f"checkpoint.storage_path={root / 'runs'}",
        f"run.name={name}",
        f"data.prepared={root / 'prepared'}",
        f"data.max_seq_len={ROW_TOKENS}",
        f"train.max_steps={steps}",
        f"train.effective_batch_size={STEP}",
        "train.micro_batch_size=4",
        "eval.every_steps=null",
        "eval.early_stopping_patience=null",
        "eval.task_metric=none",
        "checkpoint.every_steps=null",
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=1",
        # --local (the smoke run): the job trains in its driver, with no worker process to start
        f"scaling.local={str(local).lower()}",
    ]


# ---------------------------------------------------------------- the synthetic set


def ids_table(rows: int, vocab: int, rng: np.random.Generator) -> pa.Table:
    ids = rng.integers(3, vocab, size=rows * ROW_TOKENS, dtype=np.int32)
    offsets = pa.array(np.arange(0, rows * ROW_TOKENS + 1, ROW_TOKENS, dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, pa.array(ids))
    return pa.table({"input_ids": column, "labels": column})


def write_set(root: Path, gb: float, vocab: int, model: str) -> Path:
    """manifest.json of a prepared set and its token ids as the job stores them, under a key
    the job recognises as its own: the driver then reads only metadata."""
    from jobs.config import load_config

    prepared = root / "prepared"
    prepared.mkdir(parents=True)
    manifest = {
        "dataset_hash": f"sha256:stream-bench-{gb}",
        "tokenizer": model,
        "counts": {"input_rows": 0, "train": 0, "eval": 64},
        "errors": [],
        "files": {},
    }
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(
        ROOT / "configs/quickstart.yaml", job_overrides(model, root, "x", 1, True)
    ).data
    master = root / "tokens"
    rng = np.random.default_rng(0)
    train = stored.SplitWriter(stored.split_url(str(master), "train"))
    path = Path(stored.split_url(str(master), "train"))
    while not path.exists() or path.stat().st_size < gb * 2**30:  # GB on disk, compressed
        train.add_table(ids_table(8192, vocab, rng))
    held_out = stored.SplitWriter(stored.split_url(str(master), "eval"))
    held_out.add_table(ids_table(64, vocab, rng))
    convs = stored.SplitWriter(stored.split_url(str(master), "eval_conversations"))
    key = stored.set_key(
        dataset_hash=manifest["dataset_hash"], data=cfg.model_dump(mode="json"), tokenizer=model
    )
    splits = {"train": train.close(), "eval": held_out.close(), "eval_conversations": convs.close()}
    report = {"counts": manifest["counts"], "errors": [], "prepared": str(prepared)}
    stored.write_meta(str(master), {"key": key, "report": report, "samples": [], "splits": splits})
    return master


def link_set(master: Path, run_dir: Path) -> None:
    """The set where a run reads it, as hard links: a completed run removes its copy only."""
    tokens = run_dir / "data" / "tokens"
    tokens.mkdir(parents=True)
    for f in master.iterdir():
        os.link(f, tokens / f.name)


# ---------------------------------------------------------------- one job (a fresh driver)


def run_one(root: Path, name: str, model: str, steps: int, local: bool) -> None:
    """The job, in this process as its driver; prints one JSON line of what it measured."""
    from jobs.config import load_config
    from jobs.finetune import run_job

    cfg = load_config(
        ROOT / "configs/quickstart.yaml", job_overrides(model, root, name, steps, local)
    )
    t0 = time.perf_counter()
    summary = run_job(cfg)
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "driver_mb": driver,
        "worker_mb": max(summary["worker_peak_rss_mb"]),
        "seconds": time.perf_counter() - t0,
        "steps": summary["steps"],
    }
    print("RESULT " + json.dumps(result), flush=True)


def job_round(root: Path, master: Path, name: str, model: str, args) -> dict:
    link_set(master, root / "runs" / name)
    command = [sys.executable, __file__, "--run", str(root), "--name", name, "--model", model]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [*command, "--steps", str(args.steps), *(["--local"] if args.local else [])],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"job {name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# ---------------------------------------------------------------- readers


def step_indices(rows: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).permutation(rows)[:STEP].tolist()


def read_parquet_step(master: Path, indices: list[int]) -> float:
    meta = json.loads((master / "tokens.json").read_text())["splits"]["train"]
    split = stored.StoredSplit(stored.split_url(str(master), "train"), **meta)
    t0 = time.perf_counter()
    split.take(indices)
    return time.perf_counter() - t0


def write_ipc(master: Path) -> Path:
    """The same rows as an Arrow IPC file, one record batch per Parquet row group."""
    path = master.parent / "train.arrow"
    parquet = pq.ParquetFile(master / "train.parquet")
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, parquet.schema_arrow) as out:
        for g in range(parquet.num_row_groups):
            out.write_table(parquet.read_row_group(g))
    return path


def read_ipc_step(path: Path, group_rows: int, indices: list[int]) -> float:
    t0 = time.perf_counter()
    with pa.OSFile(str(path)) as f:
        reader = pa.ipc.open_file(f)
        for i in indices:
            reader.get_batch(i // group_rows).slice(i % group_rows, 1).to_pylist()
    return time.perf_counter() - t0


def read_whole(master: Path) -> float:
    """A scan of the whole split, batch by batch (what reading it all costs, in bounded memory)."""
    t0 = time.perf_counter()
    for _ in pq.ParquetFile(master / "train.parquet").iter_batches(batch_size=8192):
        pass
    return time.perf_counter() - t0


def reader_rows(master: Path, rounds: int) -> list[str]:
    """A step's 16 examples from a fresh reader (median of rounds, a new permutation each)
    against the whole split, both from the page cache."""
    meta = json.loads((master / "tokens.json").read_text())["splits"]["train"]
    ipc = write_ipc(master)
    times: dict[str, list[float]] = {"parquet": [], "ipc": [], "whole": []}
    for r in range(max(3, rounds)):
        indices = step_indices(meta["rows"], r)
        times["parquet"].append(read_parquet_step(master, indices))
        times["ipc"].append(read_ipc_step(ipc, meta["group_rows"], indices))
    times["whole"].append(read_whole(master))
    ipc.unlink()
    ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return [
        f"| Parquet row groups (the job's) | {ms['parquet']:.1f} ms | {ms['whole']:.0f} ms |",
        f"| Arrow IPC record batches | {ms['ipc']:.1f} ms | |",
    ]


# ---------------------------------------------------------------- main


def tiny_model(root: Path) -> str:
    from jobs.tiny_model import main as build

    path = root / "tiny-model"
    build(path, seed=0, hidden=256, layers=2)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--local", action="store_true", help="train in the driver (smoke run)")
    parser.add_argument("--dir", default=None, help="where the sets go (deleted afterwards)")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--name", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return run_one(Path(args.run), args.name, args.model, args.steps, args.local)
    top = Path(tempfile.mkdtemp(prefix="stream-bench-", dir=args.dir))
    try:
        measure(top, args)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def measure(top: Path, args) -> None:
    from transformers import AutoTokenizer

    model = tiny_model(top)
    vocab = len(AutoTokenizer.from_pretrained(model))
    masters = {}
    for gb in args.sizes_gb:
        t0 = time.perf_counter()
        masters[gb] = write_set(top / f"set-{gb}", gb, vocab, model)
        size = (masters[gb] / "train.parquet").stat().st_size / 2**30
        meta = json.loads((masters[gb] / "tokens.json").read_text())["splits"]["train"]
        print(
            f"{gb} GB set: {size:.2f} GiB on disk, {meta['rows']:,} rows of {ROW_TOKENS} tokens "
            f"({meta['rows'] * ROW_TOKENS * 8 / 2**30:.1f} GiB of ids in memory), "
            f"written in {time.perf_counter() - t0:.0f} s"
        )
    results: dict[float, list[dict]] = {gb: [] for gb in args.sizes_gb}
    for r in range(args.rounds):  # interleaved: each round runs every size once
        for gb in args.sizes_gb:
            name = f"r{r}"
            results[gb].append(job_round(top / f"set-{gb}", masters[gb], name, model, args))
    print_jobs(results, args.steps, args.local)
    print(f"\nreading one step's {STEP} examples from a fresh reader vs the whole train split")
    print("| reader | one step | whole split |\n|---|---|---|")
    for gb in args.sizes_gb:
        print(f"| ({gb} GB) |  |  |")
        for line in reader_rows(masters[gb], args.rounds):
            print(line)


def print_jobs(results: dict[float, list[dict]], steps: int, local: bool) -> None:
    where = "in its driver (--local)" if local else "1 Ray Train worker"
    print(f"\njob: tiny model, {where}, {steps} steps; peak RSS, best of rounds")
    print("| dataset | driver MB | worker MB | job s |\n|---|---|---|---|")
    best = {
        gb: {k: min(x[k] for x in rs) for k in ("driver_mb", "worker_mb", "seconds")}
        for gb, rs in results.items()
    }
    for gb, b in best.items():
        print(f"| {gb} GB | {b['driver_mb']:.0f} | {b['worker_mb']:.0f} | {b['seconds']:.0f} |")
    small, large = min(best), max(best)
    for who in ("driver", "worker") if large != small else ():  # the smoke run has one size
        ratio = best[large][f"{who}_mb"] / best[small][f"{who}_mb"]
        print(f"{who} peak RSS {large} GB / {small} GB = {ratio:.3f}")


if __name__ == "__main__":
    main()
