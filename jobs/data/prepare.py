"""Data preparation: messy files in, a versioned, deduplicated, leak-free training set out.

    python -m jobs.prepare configs/prepare_reviews.yaml [key.sub=value ...]
    python -m jobs.prepare configs/quickstart.yaml          # a job config: its data section and model

Every input row ends in exactly one place: a split (train/eval/test) or `dropped.jsonl` with the
stage and reason, counted in manifest.json at the first stage that drops it:

1. read, validate, normalize, render with the job's chat template, count tokens, score, sign
   (MinHash) - chunk by chunk, on Ray tasks when `workers` > 0, so the driver holds one chunk of
   Python objects at a time and the work spreads over a cluster's nodes;
2. exact duplicates, then near duplicates, over all splits together (a row from an eval/test
   source wins its group, so no copy of a held-out row stays in train) - on numpy arrays of hashes
   and signatures only; then the length filter and the quality filter;
3. split (the source's, or a hash of the content: stable as rows are added), source weights,
   write train/eval/test Parquet, dropped.jsonl and manifest.json with the dataset hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import typer
import xxhash
from pydantic import Field

from jobs.config import (
    ConfigError,
    DataConfig,
    Section,
    apply_overrides,
    parse_overrides,
    read_yaml,
    validate,
    validate_config,
)
from jobs.data.dedup import exact_duplicate_of, near_duplicate_of, signatures
from jobs.data.formats import to_example
from jobs.data.normalize import example_key, normalize_example
from jobs.data.quality import JudgeScorer, heuristic_score
from jobs.data.render import render, tokenize_example
from jobs.data.sources import RowError, SourceFile, expand_source, file_sha256, read_rows
from jobs.storage import storage_options

log = logging.getLogger("rayft.prepare")

SPLITS = ("train", "eval", "test")
# Why a row was dropped, in stage order (the manifest's count names).
MALFORMED, EXACT, NEAR, SHORT, LONG, LOW = (
    "malformed", "exact_duplicates", "near_duplicates", "too_short", "too_long", "low_quality",
)  # fmt: skip
DROP_CODES = {1: EXACT, 2: NEAR, 3: SHORT, 4: LONG, 5: LOW}
MAX_ERROR_EXAMPLES = 100  # per manifest; dropped.jsonl has every one


class PrepareConfig(Section):
    data: DataConfig
    tokenizer: str = Field(min_length=1)  # the job's model: hub id, directory or s3://
    output: str = Field(min_length=1)  # a directory (local or s3://)
    seed: int = 0  # of the hash split; a job preparing inline uses its run.seed
    workers: int = Field(0, ge=0)  # Ray tasks working chunks in parallel; 0: in this process
    chunk_rows: int = Field(2000, ge=1)


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


@dataclass
class Stage1:
    shards: list[Path] = field(default_factory=list)
    input_rows: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- stage 1: row by row, in chunks


@functools.lru_cache(maxsize=2)
def _tokenizer(name: str):
    from jobs.config import ModelConfig
    from jobs.model import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=name))


def dedup_text(example: dict[str, Any]) -> str:
    """What near-dedup compares: the turns' text without system prompts, which a whole dataset
    shares and which would make every short row look like every other."""
    if "text" in example:
        return example["text"]
    return "\n".join(m["content"] for m in example["messages"] if m["role"] != "system")


def process_chunk(
    rows: list[tuple[str, int, Any]], cfg: DataConfig, tokenizer
) -> tuple[pa.Table, list[tuple[str, str]]]:
    """Validate, normalize, render and sign one chunk of (where, source, raw row)."""
    if isinstance(tokenizer, str):
        tokenizer = _tokenizer(tokenizer)
    sources = cfg.all_sources()
    kept, errors = [], []
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
        kept.append((where, source, example, text))
    num_tokens = [len(ids) for ids in tokenizer([t for *_, t in kept], add_special_tokens=False, verbose=False)["input_ids"]] if kept else []  # fmt: skip
    scores = [heuristic_score(e) for _, _, e, _ in kept] if cfg.quality.scorer == "heuristic" else [(1.0, "") for _ in kept]  # fmt: skip
    hashes = [
        hashlib.blake2b(example_key(e).encode(), digest_size=16).digest() for _, _, e, _ in kept
    ]
    sigs = signatures([dedup_text(e) for _, _, e, _ in kept], cfg.dedup) if cfg.dedup.near else np.zeros((len(kept), 0), np.uint32)  # fmt: skip
    table = pa.table({
        "where": pa.array([w for w, *_ in kept], pa.string()),
        "source": pa.array([s for _, s, *_ in kept], pa.int32()),
        "messages": pa.array([e.get("messages") for _, _, e, _ in kept], MESSAGES_TYPE),
        "text": pa.array([e.get("text") for _, _, e, _ in kept], pa.string()),
        "num_tokens": pa.array(num_tokens, pa.int32()),
        "score": pa.array([s for s, _ in scores], pa.float32()),
        "score_reason": pa.array([r for _, r in scores], pa.string()),
        "content_hash": pa.array(hashes, pa.binary(16)),
        "signature": pa.FixedSizeListArray.from_arrays(
            pa.array(sigs.ravel(), pa.uint32()), max(sigs.shape[1], 1)
        ) if sigs.shape[1] else pa.nulls(len(kept), pa.list_(pa.uint32(), 1)),
    })  # fmt: skip
    return table, errors


MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def iter_chunks(files: list[SourceFile], size: int, stage: Stage1):
    chunk = []
    for file in files:
        rows_before = stage.input_rows
        for where, row in read_rows(file):
            chunk.append((where, file.source, row))
            stage.input_rows += 1
            if len(chunk) == size:
                yield chunk
                chunk = []
        stage.files.append({"source": file.source, "url": file.url, "rows": stage.input_rows - rows_before})  # fmt: skip
    if chunk:
        yield chunk


def run_stage1(cfg: PrepareConfig, files, tokenizer, work: Path, dropped, counts, progress):
    """Chunks through process_chunk (in this process, or as Ray tasks with bounded in-flight)."""
    stage = Stage1()
    task = progress.add_task("read, validate, render, sign", total=None)

    def finish(index: int, table: pa.Table, errors: list[tuple[str, str]]) -> None:
        path = work / f"shard-{index:06d}.parquet"
        pq.write_table(table, path)
        stage.shards.append(path)
        for where, reason in errors:
            counts["malformed_by_reason"][_reason_kind(reason)] += 1
            dropped.write(where, MALFORMED, reason)
        progress.update(task, advance=table.num_rows + len(errors))
        if not progress.console.is_terminal and len(stage.shards) % 50 == 0:
            log.info("read, validate, render, sign: %d rows", stage.input_rows)  # for job logs

    chunks = iter_chunks(files, cfg.chunk_rows, stage)
    if cfg.workers == 0:
        for index, chunk in enumerate(chunks):
            finish(index, *process_chunk(chunk, cfg.data, tokenizer))
    else:
        import ray

        remote = ray.remote(num_cpus=1, max_retries=2)(process_chunk)
        data_ref = ray.put(cfg.data)
        pending: dict[Any, int] = {}
        for index, chunk in enumerate(chunks):
            pending[remote.remote(chunk, data_ref, cfg.tokenizer)] = index
            while (
                len(pending) >= 2 * cfg.workers
            ):  # bounded: the driver never holds the whole input
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                finish(pending.pop(ref), *_get(ref))
        for ref in list(pending):
            finish(pending.pop(ref), *_get(ref))
    stage.shards.sort()
    progress.update(task, total=stage.input_rows, completed=stage.input_rows)
    return stage


def _get(ref):
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ConfigError):  # on_error=fail inside a worker
            raise e.cause from None
        raise


def _reason_kind(reason: str) -> str:
    """'messages[2]: unknown role 'bot'' -> 'unknown role': the count key of a malformed row."""
    for kind in ("invalid JSON", "invalid UTF-8", "unknown role", "roles out of order",
                 "no assistant turn", "missing field", "missing or empty", "empty content",
                 "not a string", "unknown format", "not an object", "is empty"):  # fmt: skip
        if kind in reason:
            return kind
    return reason.split(" (")[0][:60]


# ---------------------------------------------------------------- stage 2: decisions on arrays


def _column(shards: list[Path], name: str) -> pa.Array:
    return pa.concat_arrays(
        [pq.read_table(p, columns=[name]).column(name).combine_chunks() for p in shards]
    ) if shards else pa.array([])  # fmt: skip


def decide(cfg: PrepareConfig, shards: list[Path], progress) -> dict[str, np.ndarray]:
    """Per kept-after-validation row: drop code (0 keeps), the row it duplicates, split, repeats."""
    data = cfg.data
    sources = data.all_sources()
    task = progress.add_task("dedup, filter, split", total=5)
    source = _column(shards, "source").to_numpy(zero_copy_only=False).astype(np.int32)
    n = len(source)
    hashes = np.frombuffer(_column(shards, "content_hash").buffers()[1], dtype=np.uint64)[: 2 * n]
    hashes = hashes.reshape(n, 2) if n else np.zeros((0, 2), np.uint64)
    num_tokens = _column(shards, "num_tokens").to_numpy(zero_copy_only=False)
    fixed = np.array([s.split for s in sources])
    held_out = np.isin(fixed[source], ["eval", "test"]) if n else np.zeros(0, bool)
    # held-out rows win their duplicate group, then earlier rows win
    rank = np.where(held_out, 0, n) + np.arange(n, dtype=np.int64)
    code = np.zeros(n, np.int8)
    dup_of = np.full(n, -1, np.int64)

    if data.dedup.exact:
        dup_of = exact_duplicate_of(hashes[:, 0], rank)
        code[dup_of >= 0] = 1
    progress.advance(task)
    if data.dedup.near and n:
        alive = np.flatnonzero(code == 0)
        sigs = _column(shards, "signature").flatten().to_numpy().reshape(n, data.dedup.num_perm)
        near = near_duplicate_of(sigs[alive], rank[alive], data.dedup.threshold)
        hit = near >= 0
        code[alive[hit]] = 2
        dup_of[alive[hit]] = alive[near[hit]]
        del sigs
    progress.advance(task)
    alive = code == 0
    code[alive & (num_tokens < data.length.min_tokens)] = 3
    code[alive & (num_tokens > data.length.max_tokens)] = 4
    progress.advance(task)
    score = _column(shards, "score").to_numpy(zero_copy_only=False).astype(np.float64)
    reason = {}  # row -> why its score is low, filled in only for judged rows (the rest: on disk)
    if data.quality.scorer != "none":
        alive_idx = np.flatnonzero(code == 0)
        if data.quality.scorer == "judge" and len(alive_idx):
            examples = _examples(shards, alive_idx)
            graded = JudgeScorer(data.quality.judge).score(examples)
            score[alive_idx] = [s for s, _ in graded]
            reason.update(zip(alive_idx.tolist(), [r for _, r in graded], strict=True))
        if data.quality.min_score is not None:
            code[alive_idx[score[alive_idx] < data.quality.min_score]] = 5
        alive_idx = np.flatnonzero(code == 0)
        n_bottom = int(data.quality.drop_bottom_fraction * len(alive_idx))
        if n_bottom:
            order = np.lexsort((rank[alive_idx], score[alive_idx]))  # lowest score, then latest
            code[alive_idx[order[:n_bottom]]] = 5
    progress.advance(task)

    split = _hash_split(hashes, cfg.seed, data.eval_fraction, data.test_fraction)
    split = np.where(fixed[source] == "auto", split, fixed[source]) if n else split
    weight = np.array([s.weight for s in sources])[source] if n else np.zeros(0)
    frac = _unit(hashes, cfg.seed + 1)
    repeats = np.floor(weight).astype(np.int64) + (frac < weight - np.floor(weight))
    repeats = np.where(split == "train", repeats, 1)
    progress.advance(task)
    return {"code": code, "dup_of": dup_of, "split": split, "repeats": repeats,
            "hashes": hashes, "score": score, "reason": reason, "num_tokens": num_tokens}  # fmt: skip


def _unit(hashes: np.ndarray, seed: int) -> np.ndarray:
    """A number in [0, 1) per row from its content hash and a seed: the same row, the same number."""
    key = np.uint64(xxhash.xxh64_intdigest(str(seed).encode()))
    with np.errstate(over="ignore"):  # splitmix64's finalizer: wrap-around is the point
        x = hashes[:, 1] ^ key
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _hash_split(hashes, seed, eval_fraction, test_fraction) -> np.ndarray:
    u = _unit(hashes, seed)
    return np.where(u < eval_fraction, "eval", np.where(u < eval_fraction + test_fraction, "test", "train"))  # fmt: skip


def _examples(shards: list[Path], indices: np.ndarray) -> list[dict[str, Any]]:
    table = pa.concat_tables(pq.read_table(p, columns=["messages", "text"]) for p in shards)
    table = table.take(pa.array(indices))
    return [{"messages": m} if m is not None else {"text": t}
            for m, t in zip(table.column("messages").to_pylist(), table.column("text").to_pylist(), strict=True)]  # fmt: skip


# ---------------------------------------------------------------- stage 3: write


class DroppedLog:
    """dropped.jsonl: every row that is not in a split, with the stage and the reason."""

    def __init__(self, path: Path):
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.examples: list[dict[str, str]] = []

    def write(self, where: str, stage: str, reason: str, duplicate_of: str | None = None) -> None:
        entry = {"where": where, "stage": stage, "reason": reason}
        if duplicate_of:
            entry["duplicate_of"] = duplicate_of
        self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        if len(self.examples) < MAX_ERROR_EXAMPLES:
            self.examples.append(entry)

    def close(self) -> None:
        self.file.close()


OUTPUT_COLUMNS = ["messages", "text", "source", "where", "num_tokens", "score"]


def write_splits(cfg, shards, decision, out_fs, out_root, dropped, counts, progress) -> str:
    """Write the kept rows per split, log the dropped ones, and return the dataset hash."""
    task = progress.add_task("write", total=len(decision["code"]))
    digest = hashlib.sha256(_hashed_config(cfg).encode())
    writers, handles = {}, []
    where_all = None
    offset = 0
    code, split, repeats = decision["code"], decision["split"], decision["repeats"]
    if (decision["dup_of"] >= 0).any():  # duplicates name the row they duplicate
        where_all = _column(shards, "where")
    per_split_hashes: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    for path in shards:
        table = pq.read_table(path)
        n = table.num_rows
        sl = slice(offset, offset + n)
        for i in np.flatnonzero(code[sl] != 0):
            g = offset + i
            kind = DROP_CODES[int(code[g])]
            dup = decision["dup_of"][g]
            reason = {EXACT: "exact duplicate", NEAR: "near duplicate",
                      SHORT: f"{decision['num_tokens'][g]} tokens < data.length.min_tokens={cfg.data.length.min_tokens}",
                      LONG: f"{decision['num_tokens'][g]} tokens > data.length.max_tokens={cfg.data.length.max_tokens}",
                      LOW: f"quality {decision['score'][g]:.2f} ({decision['reason'].get(int(g)) or table.column('score_reason')[i].as_py()})"}[kind]  # fmt: skip
            dropped.write(table.column("where")[i].as_py(), kind, reason,
                          where_all[int(dup)].as_py() if dup >= 0 else None)  # fmt: skip
        for name in SPLITS:
            rows = np.flatnonzero((code[sl] == 0) & (split[sl] == name))
            rows = np.repeat(rows, repeats[sl][rows])
            if not len(rows):
                continue
            if name not in writers:
                handles.append(out_fs.open(f"{out_root}/{name}.parquet", "wb"))
                writers[name] = pq.ParquetWriter(handles[-1], table.select(OUTPUT_COLUMNS).schema)
            writers[name].write_table(table.select(OUTPUT_COLUMNS).take(pa.array(rows)))
            per_split_hashes[name].append(decision["hashes"][offset + rows].tobytes())
            counts[name] += len(rows)
        offset += n
        progress.update(task, advance=n)
    for w in writers.values():
        w.close()
    for h in handles:
        h.close()
    for name in SPLITS:
        digest.update(f"\n{name}\n".encode())
        for chunk in per_split_hashes[name]:
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _hashed_config(cfg: PrepareConfig) -> str:
    """What the dataset hash covers besides the rows: how they were prepared, not where from."""
    data = cfg.data.model_dump(mode="json")
    for s in data["sources"]:
        s.pop("path")
    data.pop("train_files"), data.pop("eval_files"), data.pop("prepared")
    if data["quality"]["judge"]:
        data["quality"]["judge"].pop("api_key_env")
    return json.dumps({"data": data, "seed": cfg.seed}, sort_keys=True)


# ---------------------------------------------------------------- the recipe


def prepare(cfg: PrepareConfig, tokenizer=None, show_progress: bool = True) -> Manifest:
    """Run all stages; returns the manifest (also written as OUTPUT/manifest.json)."""
    from rich.progress import Progress

    start = time.time()
    tokenizer = tokenizer if tokenizer is not None else cfg.tokenizer
    if cfg.workers == 0 and isinstance(tokenizer, str):
        tokenizer = _tokenizer(tokenizer)
    files = [f for i, s in enumerate(cfg.data.all_sources()) for f in expand_source(i, s)]
    out_fs, out_root = fsspec.core.url_to_fs(cfg.output, **storage_options(cfg.output))
    out_fs.makedirs(out_root, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rayft-prepare-"))
    counts: dict[str, Any] = {k: 0 for k in ("input_rows", MALFORMED, EXACT, NEAR, SHORT, LONG, LOW,
                                             "train", "eval", "test")}  # fmt: skip
    counts["malformed_by_reason"] = _Counter()
    dropped = DroppedLog(work / "dropped.jsonl")
    try:
        with Progress(disable=not show_progress, transient=False) as progress:
            stage1 = run_stage1(cfg, files, tokenizer, work, dropped, counts, progress)
            decision = decide(cfg, stage1.shards, progress)
            for code, name in DROP_CODES.items():
                counts[name] = int((decision["code"] == code).sum())
            counts["input_rows"] = stage1.input_rows
            counts[MALFORMED] = sum(counts["malformed_by_reason"].values())
            dataset_hash = write_splits(cfg, stage1.shards, decision, out_fs, out_root, dropped,
                                        counts, progress)  # fmt: skip
        dropped.close()
        out_fs.put_file(str(work / "dropped.jsonl"), f"{out_root}/dropped.jsonl")
        counts.update(_extra_counts(cfg, decision, counts))
        manifest = {
            "dataset_hash": dataset_hash,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tokenizer": cfg.tokenizer,
            "counts": {**counts, "malformed_by_reason": dict(counts["malformed_by_reason"])},
            "files": {s: f"{s}.parquet" for s in SPLITS if counts[s]},
            "dropped_file": "dropped.jsonl",
            "errors": dropped.examples,
            "sources": _source_entries(cfg, stage1.files),
            "config": json.loads(cfg.model_dump_json()),
            "seconds": round(time.time() - start, 2),
        }
        with out_fs.open(f"{out_root}/manifest.json", "w") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
    finally:
        dropped.close()
        shutil.rmtree(work, ignore_errors=True)
    _check_accounted(manifest["counts"])
    return Manifest(manifest, cfg.output)


class _Counter(dict):
    def __missing__(self, key):
        return 0


def _extra_counts(cfg, decision, counts) -> dict[str, int]:
    code, split, dup_of = decision["code"], decision["split"], decision["dup_of"]
    dups = np.flatnonzero(dup_of >= 0)
    # a duplicate of a held-out row that would otherwise have gone to train: leakage prevented
    leaked = int(((split[dup_of[dups]] != "train") & (split[dups] == "train")).sum()) if len(dups) else 0  # fmt: skip
    kept = code == 0
    train_keys = decision["hashes"][kept & (split == "train"), 0]
    held_keys = decision["hashes"][kept & (split != "train"), 0]
    return {
        "train_unique": int((kept & (split == "train")).sum()),
        "weighted_out": int((kept & (split == "train") & (decision["repeats"] == 0)).sum()),
        "leakage_prevented": leaked,
        "train_eval_overlap": int(len(np.intersect1d(train_keys, held_keys))),
    }


def _check_accounted(counts: dict[str, int]) -> None:
    """Every input row is in exactly one place: a split (before weighting) or a drop count."""
    placed = counts["train_unique"] + counts["eval"] + counts["test"]
    dropped = sum(counts[k] for k in (MALFORMED, EXACT, NEAR, SHORT, LONG, LOW))
    if placed + dropped != counts["input_rows"]:
        raise RuntimeError(f"rows unaccounted for: {counts}")  # a bug, never bad input


def _source_entries(cfg: PrepareConfig, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    entries = []
    for i, s in enumerate(cfg.data.all_sources()):
        mine = [f for f in files if f["source"] == i]
        entries.append({**s.model_dump(mode="json"),
                        "files": [{"url": f["url"], "rows": f["rows"], "sha256": file_sha256(f["url"])} for f in mine]})  # fmt: skip
    return entries


# ---------------------------------------------------------------- reading a prepared set


def read_manifest(path: str) -> dict[str, Any]:
    fs, root = fsspec.core.url_to_fs(path, **storage_options(path))
    if not fs.exists(f"{root}/manifest.json"):
        raise ConfigError(f"data.prepared: {path} has no manifest.json (write it with python -m jobs.prepare)")  # fmt: skip
    with fs.open(f"{root}/manifest.json") as f:
        return json.load(f)


def read_split(path: str, name: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, example) rows of one split of a prepared set; [] when the split is empty."""
    manifest = read_manifest(path)
    if name not in manifest["files"]:
        return []
    fs, root = fsspec.core.url_to_fs(path, **storage_options(path))
    with fs.open(f"{root}/{manifest['files'][name]}", "rb") as f:
        table = pq.read_table(f, columns=["where", "messages", "text"])
    return [(w, {"messages": m} if m is not None else {"text": t})
            for w, m, t in zip(*(table.column(c).to_pylist() for c in ("where", "messages", "text")), strict=True)]  # fmt: skip


# ---------------------------------------------------------------- the job's entry


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    eval_conversations: list[list[dict[str, str]]]  # for generated-answer metrics
    dataset_hash: str
    report: dict[str, Any]  # the manifest's counts, errors and where it lives
    train_samples: list[list[dict[str, str]]] = field(default_factory=list)  # few-shot examples


def prepare_data(
    cfg: DataConfig,
    tokenizer,
    seed: int,
    tokenizer_name: str = "",
    inline_output: str | None = None,
) -> PreparedData:
    """What a job trains on: a prepared set (data.prepared), or one prepared now from `cfg`
    (into `inline_output` when given, so the job can keep its manifest and dropped rows)."""
    path, tmp = cfg.prepared, None
    if path is None:
        path = inline_output or (tmp := tempfile.mkdtemp(prefix="rayft-data-"))
        pcfg = PrepareConfig(data=cfg, tokenizer=tokenizer_name or "inline", output=path, seed=seed)
        prepare(pcfg, tokenizer=tokenizer, show_progress=False)
    try:
        manifest = read_manifest(path)
        if cfg.prepared and tokenizer_name and manifest["tokenizer"] != tokenizer_name:
            log.warning(
                "data.prepared: %s was prepared with the tokenizer of %s, this job uses %s "
                "(its length filter counted other tokens)", path, manifest["tokenizer"], tokenizer_name
            )  # fmt: skip
        report = {"counts": manifest["counts"], "errors": manifest["errors"][:10],
                  "prepared": cfg.prepared or "inline"}  # fmt: skip
        train, train_examples = tokenize_rows(read_split(path, "train"), tokenizer, cfg, report)
        eval_, eval_examples = tokenize_rows(read_split(path, "eval"), tokenizer, cfg, report)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if not train:
        raise ConfigError(f"data: no usable training rows ({_summary(manifest)})")
    if not eval_:
        raise ConfigError(
            f"data: the held-out set is empty ({_summary(manifest)}); give more rows, a larger "
            "data.eval_fraction or eval files (split: eval)"
        )
    convs = [e["messages"] for e in eval_examples if "messages" in e]
    samples = [e["messages"] for e in train_examples[:64] if "messages" in e]
    return PreparedData(train, eval_, convs, manifest["dataset_hash"], report, samples)


def _summary(manifest: dict[str, Any]) -> str:
    c = manifest["counts"]
    parts = [f"{k} {v}" for k, v in c.items() if isinstance(v, int) and v]
    errors = "; ".join(f"{e['where']}: {e['reason']}" for e in manifest["errors"][:3])
    return ", ".join(parts) + (f"; e.g. {errors}" if errors else "")


def tokenize_rows(rows, tokenizer, cfg: DataConfig, report: dict[str, Any]):
    """Token ids + labels; a row whose answer lies past max_seq_len is dropped and counted."""
    examples, kept = [], []
    for where, example in rows:
        try:
            examples.append(tokenize_example(example, tokenizer, cfg.max_seq_len))
            kept.append(example)
        except RowError as e:
            if cfg.on_error == "fail":
                raise ConfigError(f"{where}: {e} (data.on_error=fail)") from None
            report.setdefault("dropped_at_tokenize", []).append(f"{where}: {e}")
    return examples, kept


# ---------------------------------------------------------------- CLI


def load_prepare_config(path: str | Path, overrides: list[str] | None = None) -> PrepareConfig:
    """A prepare YAML (data, tokenizer, output), or a job YAML (its data section and model)."""
    raw = read_yaml(path)
    parsed = parse_overrides(overrides or [])
    if "run" in raw and "model" in raw:  # a job config
        job_keys = {k: v for k, v in parsed.items() if k.split(".")[0] in ("run", "model", "data")}
        job = validate_config(apply_overrides(raw, job_keys), str(path))
        raw = {"data": job.data.model_dump(exclude_unset=True), "tokenizer": job.model.name_or_path,
               "output": f"prepared/{job.run.name}", "seed": job.run.seed}  # fmt: skip
        parsed = {k: v for k, v in parsed.items() if k not in job_keys}
    return validate(PrepareConfig, apply_overrides(raw, parsed), str(path))


def print_report(manifest: Manifest) -> None:
    from rich.console import Console
    from rich.table import Table

    c = manifest.counts
    table = Table(title=f"prepared: {manifest.path}")
    table.add_column("rows")
    table.add_column("count", justify="right")
    for key in ("input_rows", MALFORMED, EXACT, NEAR, SHORT, LONG, LOW, "train", "eval", "test",
                "leakage_prevented"):  # fmt: skip
        table.add_row(key, f"{c[key]:,}")
    console = Console()
    console.print(table)
    for reason, n in sorted(c["malformed_by_reason"].items(), key=lambda kv: -kv[1]):
        console.print(f"  malformed: {reason}: {n}")
    for entry in manifest.data["errors"][:5]:
        console.print(f"  e.g. {entry['where']}: {entry['reason']}")
    console.print(f"dataset hash {manifest.dataset_hash}  ({manifest.data['seconds']} s)")


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    config: Annotated[Path, typer.Argument(help="prepare YAML (or a job YAML)")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides: data.dedup.threshold=0.9")
    ] = None,
) -> None:
    """Prepare a dataset: validate, normalize, deduplicate, filter, split; write Parquet + manifest."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_prepare_config(config, overrides)
        if cfg.workers:
            from jobs.distributed import init_ray

            init_ray(None, num_cpus=None)
        manifest = prepare(cfg)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    print_report(manifest)


if __name__ == "__main__":
    app()
