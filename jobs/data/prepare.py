"""Data preparation: messy files in, a versioned, deduplicated, leak-free training set out.

    python -m jobs.prepare tests/fixtures/messy/prepare.yaml [key.sub=value ...]
    python -m jobs.prepare configs/quickstart.yaml          # a job config: its data section and model

Every input row ends in exactly one place: a split (train/eval/test) or `dropped.jsonl` with the
stage and reason (drops.py), counted in manifest.json at the first stage that drops it:

1. chunks.py: read, validate, normalize, render with the job's chat template, count tokens,
   score, sign (MinHash), chunk by chunk, on Ray tasks when `workers` > 0;
2. decisions.py: exact then near duplicates over all splits together (a held-out row wins its
   group), the length and quality filters, the split and source weights (split.py), on arrays;
3. write.py: train/eval/test Parquet, dropped.jsonl, and manifest.py: manifest.json with the
   dataset hash.

`prepare_data` is what an SFT job trains on: this pipeline run now (or a set it wrote before,
data.prepared), read back and tokenized.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from core import storage
from core.config import ConfigError, apply_overrides, parse_overrides, read_yaml, validate
from jobs.config import DataConfig, validate_config
from jobs.data import stored
from jobs.data.chunks import cached_tokenizer, read_chunks
from jobs.data.decisions import decide
from jobs.data.drops import Drop, DroppedLog
from jobs.data.manifest import (
    Manifest,
    check_accounted,
    count_rows,
    manifest_entries,
    read_manifest,
    read_split,
    read_split_batches,
    summary,
)
from jobs.data.prepare_config import PrepareConfig
from jobs.data.prepared import PreparedData
from jobs.data.render import tokenize_rows
from jobs.data.sources import expand_source
from jobs.data.write import upload, write_splits

__all__ = [
    "Manifest",
    "PrepareConfig",
    "PreparedData",
    "load_prepare_config",
    "main",
    "prepare",
    "prepare_data",
    "store_sft",
    "read_manifest",
    "read_split",
]

log = logging.getLogger("rayft.prepare")
FEW_SHOT_POOL = 64  # the first train examples few-shot samples are drawn from


def prepare(cfg: PrepareConfig, tokenizer=None, show_progress: bool = True) -> Manifest:
    """Run all stages; returns the manifest (also written as OUTPUT/manifest.json)."""
    from rich.progress import Progress

    start = time.time()
    tokenizer = tokenizer if tokenizer is not None else cfg.tokenizer
    if cfg.workers == 0 and isinstance(tokenizer, str):
        tokenizer = cached_tokenizer(tokenizer)
    files = [f for i, s in enumerate(cfg.data.all_sources()) for f in expand_source(i, s)]
    work = Path(tempfile.mkdtemp(prefix="rayft-prepare-"))
    dropped = DroppedLog(work / "dropped.jsonl")
    try:
        with Progress(disable=not show_progress, transient=False) as progress:
            shards = read_chunks(cfg, files, tokenizer, work, dropped, progress)
            decision = decide(cfg, shards.paths, progress)
            dataset_hash, written = write_splits(cfg, shards.paths, decision, dropped, progress)
        dropped.close()
        upload(dropped.path, storage.join(cfg.output, "dropped.jsonl"))
        counts = count_rows(shards, decision, written)
        manifest = manifest_entries(cfg, dataset_hash, counts, dropped.examples, shards, start)
        text = json.dumps(manifest, indent=2, ensure_ascii=False)
        storage.write_text(storage.join(cfg.output, "manifest.json"), text)
    finally:
        dropped.close()
        shutil.rmtree(work, ignore_errors=True)
    check_accounted(manifest["counts"])
    return Manifest(manifest, cfg.output)


# ---------------------------------------------------------------- an SFT job's data


def prepare_data(
    cfg: DataConfig,
    tokenizer,
    seed: int,
    tokenizer_name: str = "",
    inline_output: str | None = None,
) -> PreparedData:
    """An SFT set in memory: a prepared set (data.prepared), or one prepared now from `cfg` (into
    `inline_output` when given, so the job can keep its manifest and dropped rows). A job
    stores it for its workers instead (store_sft)."""
    path, tmp = cfg.prepared, None
    if path is None:
        path = inline_output or (tmp := tempfile.mkdtemp(prefix="rayft-data-"))
    try:
        manifest = _prepared_manifest(cfg, tokenizer, seed, tokenizer_name, path)
        report = _report(cfg, manifest)
        train, train_examples = tokenize_rows(read_split(path, "train"), tokenizer, cfg, report)
        eval_, eval_examples = tokenize_rows(read_split(path, "eval"), tokenizer, cfg, report)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    _check_usable(len(train), len(eval_), manifest)
    convs, samples = _chats(eval_examples), _chats(train_examples[:FEW_SHOT_POOL])
    return PreparedData(train, eval_, convs, manifest["dataset_hash"], report, samples)


def store_sft(
    cfg: DataConfig, tokenizer, seed: int, tokenizer_name: str, inline_output: str, directory: str
) -> PreparedData:
    """An SFT job's set, tokenized batch by batch into `directory` (on storage, where workers read
    it; stored.py), or the set already there from the same data and tokenizer (a resumed run):
    then only the manifest is read."""
    path = cfg.prepared or inline_output
    manifest = _prepared_manifest(cfg, tokenizer, seed, tokenizer_name, path)
    key = stored.set_key(
        dataset_hash=manifest["dataset_hash"],
        data=cfg.model_dump(mode="json"),
        tokenizer=tokenizer_name,
    )
    meta = stored.read_meta(directory, key) or _tokenize_into(cfg, tokenizer, path, directory, key)
    splits = stored.open_splits(directory, meta)
    _check_usable(len(splits["train"]), len(splits["eval"]), manifest)
    return PreparedData(
        splits["train"],
        splits["eval"],
        splits["eval_conversations"],
        manifest["dataset_hash"],
        meta["report"],
        meta["samples"],
    )


def _tokenize_into(cfg: DataConfig, tokenizer, path: str, directory: str, key: str) -> dict:
    """The prepared set at `path` tokenized into `directory`, one batch of rows in memory at a
    time; returns tokens.json's contents (written last)."""
    report = _report(cfg, read_manifest(path))
    names = ("train", "eval", "eval_conversations")
    writers = {n: stored.SplitWriter(stored.split_url(directory, n)) for n in names}
    samples: list = []
    seen = 0
    for name in ("train", "eval"):
        for rows in read_split_batches(path, name):
            ids, examples = tokenize_rows(rows, tokenizer, cfg, report)
            writers[name].add(ids)
            if name == "eval":
                writers["eval_conversations"].add([{"messages": c} for c in _chats(examples)])
            else:
                samples += _chats(examples[: max(0, FEW_SHOT_POOL - seen)])
                seen += len(examples)
    meta = {"key": key, "report": report, "samples": samples}
    meta["splits"] = {n: w.close() for n, w in writers.items()}
    stored.write_meta(directory, meta)
    return meta


def _prepared_manifest(cfg: DataConfig, tokenizer, seed: int, tokenizer_name: str, path: str):
    """The manifest of the set at `path`: data.prepared's, or that of the pipeline run now."""
    if cfg.prepared is None:  # a bad file fails in here
        pcfg = PrepareConfig(data=cfg, tokenizer=tokenizer_name or "inline", output=path, seed=seed)
        prepare(pcfg, tokenizer=tokenizer, show_progress=False)
    manifest = read_manifest(path)
    if cfg.prepared and tokenizer_name and manifest["tokenizer"] != tokenizer_name:
        log.warning(
            "data.prepared: %s was prepared with the tokenizer of %s, this job uses %s "
            "(its length filter counted other tokens)",
            path,
            manifest["tokenizer"],
            tokenizer_name,
        )
    return manifest


def _report(cfg: DataConfig, manifest: dict) -> dict:
    return {
        "counts": manifest["counts"],
        "errors": manifest["errors"][:10],
        "prepared": cfg.prepared or "inline",
    }


def _chats(examples: list[dict]) -> list[list[dict]]:
    """Generated-answer metrics and few-shot samples are plain chats: a conversation with tools
    needs its tools header in the prompt (jobs.demo_tools measures tool calls)."""
    return [e["messages"] for e in examples if "messages" in e and "tools" not in e]


def _check_usable(n_train: int, n_eval: int, manifest: dict) -> None:
    if not n_train:
        raise ConfigError(f"data: no usable training rows ({summary(manifest)})")
    if not n_eval:
        raise ConfigError(
            f"data: the held-out set is empty ({summary(manifest)}); give more rows, a larger "
            "data.eval_fraction or eval files (split: eval)"
        )


# ---------------------------------------------------------------- CLI


def load_prepare_config(path: str | Path, overrides: list[str] | None = None) -> PrepareConfig:
    """A prepare YAML (data, tokenizer, output), or a job YAML (its data section and model)."""
    raw = read_yaml(path)
    parsed = parse_overrides(overrides or [])
    if "run" in raw and "model" in raw:  # a job config
        job_keys = {k: v for k, v in parsed.items() if k.split(".")[0] in ("run", "model", "data")}
        job = validate_config(apply_overrides(raw, job_keys), str(path))
        raw = {
            "data": job.data.model_dump(exclude_unset=True),
            "tokenizer": job.model.name_or_path,
            "output": f"prepared/{job.run.name}",
            "seed": job.run.seed,
        }
        parsed = {k: v for k, v in parsed.items() if k not in job_keys}
    return validate(PrepareConfig, apply_overrides(raw, parsed), str(path))


REPORT_ROWS = ["input_rows", *(d.count_name for d in Drop), "train", "eval", "test"]


def print_report(manifest: Manifest) -> None:
    from rich.console import Console
    from rich.table import Table

    c = manifest.counts
    table = Table(title=f"prepared: {manifest.path}")
    table.add_column("rows")
    table.add_column("count", justify="right")
    for key in [*REPORT_ROWS, "leakage_prevented"]:
        table.add_row(key, f"{c[key]:,}")
    console = Console()
    console.print(table)
    for reason, n in sorted(c["malformed_by_reason"].items(), key=lambda kv: -kv[1]):
        console.print(f"  malformed: {reason}: {n}")
    for entry in manifest.data["errors"][:5]:
        console.print(f"  e.g. {entry['where']}: {entry['reason']}")
    console.print(f"dataset hash {manifest.dataset_hash}  ({manifest.data['seconds']} s)")


def main(
    config: Annotated[Path, typer.Argument(help="prepare YAML (or a job YAML)")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides: data.dedup.threshold=0.9")
    ] = None,
) -> None:
    """Prepare a dataset: validate, normalize, deduplicate, filter, split; write Parquet + manifest."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_prepare_config(config, overrides)
    if cfg.workers:
        from core.ray_cluster import init_ray

        init_ray(None, num_cpus=None)
    print_report(prepare(cfg))
