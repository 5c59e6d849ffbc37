"""The data pipeline: sources -> formats -> normalize -> render -> dedup/length/quality -> split.

sources.py    files (local, globs, s3://, saved datasets) and their rows with file:line
formats.py    rows in OpenAI/ShareGPT/Alpaca/prompt-completion/text formats -> messages, validated
normalize.py  Unicode and whitespace normalization, the canonical text an example hashes as
render.py     the chat template's render, token ids, labels masked to the answer turns
dedup.py      exact and MinHash near-duplicate detection over numpy arrays
quality.py    heuristic and LLM-judge quality scores
split.py      the hash split and source weights
drops.py      why a row is dropped (Drop), and dropped.jsonl
chunks.py     stage 1: rows -> validated, rendered, signed Parquet shards (in chunks, on Ray)
decisions.py  stage 2: dedup, length, quality and split decisions on arrays
write.py      stage 3: train/eval/test Parquet and the dataset hash
manifest.py   manifest.json, and reading a prepared set back
prepare.py    the offline pipeline (`python -m jobs.prepare`) and an SFT job's data
pairs.py      preference pairs (DPO): TRL's formats -> prompt/chosen/rejected token ids
prompts.py    prompts (GRPO): prompt token ids and the row's fields the graders read
prepared.py   PreparedData: what a job trains on, for any objective
stored.py     a job's token ids on storage, and the sequence workers read them through

A job's driver makes one call, load_for_job: its objective's loader reads (and, for SFT,
prepares) the data and tokenizes it into the run's directory on storage, where each worker reads
the rows of its steps (stored.py); nothing the size of the dataset goes through Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from core import storage
from jobs.config import JobConfig
from jobs.data import stored
from jobs.data.drops import Drop
from jobs.data.pairs import prepare_pairs
from jobs.data.prepare import store_sft
from jobs.data.prepared import PreparedData
from jobs.data.prompts import prepare_prompts

DROP_COUNTS = {d.count_name for d in Drop}


def tokens_dir(cfg: JobConfig) -> str:
    """Where a job's workers read its examples: under the run's directory on storage, which every
    node of a cluster reaches (stored.py)."""
    return storage.join(cfg.checkpoint.storage_path, cfg.run.name, "data", "tokens")


def load_sft(cfg: JobConfig, tokenizer, workdir: str | Path) -> PreparedData:
    """Conversations or text: the prepared set (data.prepared), or the pipeline run now into
    `workdir` (its manifest and dropped rows then stay with the run), tokenized into storage."""
    name = cfg.model.name_or_path
    return store_sft(cfg.data, tokenizer, cfg.run.seed, name, str(workdir), tokens_dir(cfg))


def load_dpo(cfg: JobConfig, tokenizer, workdir: str | Path) -> PreparedData:
    """Preference pairs, read, validated and split now (dedup and quality filters are SFT's)."""
    return store_in_memory(cfg, prepare_pairs(cfg.data, tokenizer, cfg.run.seed))


def load_grpo(cfg: JobConfig, tokenizer, workdir: str | Path) -> PreparedData:
    """Prompts and the fields graders read, read, validated and split now."""
    completion = cfg.train.grpo.max_completion_length
    return store_in_memory(cfg, prepare_prompts(cfg.data, tokenizer, cfg.run.seed, completion))


def store_in_memory(cfg: JobConfig, data: PreparedData) -> PreparedData:
    """Splits built in memory (pairs, prompts) written where the workers read them, unless the
    same set is there already (a resumed run)."""
    directory = tokens_dir(cfg)
    key = stored.set_key(
        dataset_hash=data.dataset_hash,
        data=cfg.data.model_dump(mode="json"),
        tokenizer=cfg.model.name_or_path,
        method=cfg.train.method,
        completion=cfg.train.grpo.max_completion_length if cfg.train.grpo else None,
    )
    meta = stored.read_meta(directory, key)
    if meta is None:
        splits = stored.write_lists(directory, {"train": data.train, "eval": data.eval})
        meta = {"key": key, "report": data.report, "samples": [], "splits": splits}
        stored.write_meta(directory, meta)
    splits = stored.open_splits(directory, meta)
    return replace(data, train=splits["train"], eval=splits["eval"])


# train.method -> its loader; a new objective is one more entry
LOADERS: dict[str, Callable[[JobConfig, object, str | Path], PreparedData]] = {
    "sft": load_sft,
    "dpo": load_dpo,
    "grpo": load_grpo,
}


def load_for_job(cfg: JobConfig, tokenizer, workdir: str | Path) -> PreparedData:
    """What the job trains and evaluates on, for its objective (train.method): its splits are
    StoredSplits, read from storage by whoever indexes them (cfg's storage path resolved)."""
    return LOADERS[cfg.train.method](cfg, tokenizer, workdir)


def summary_lines(data: PreparedData) -> list[str]:
    """What the driver prints about the data before training: sizes, hash, drops, first errors."""
    report, counts = data.report, data.report["counts"]
    lines = [
        f"data: {len(data.train)} train / {len(data.eval)} eval examples from "
        f"{counts['input_rows']} rows ({report['prepared']}), {data.dataset_hash[:19]}"
    ]
    dropped = {k: v for k, v in counts.items() if isinstance(v, int) and v and k in DROP_COUNTS}
    if dropped:
        lines.append("data: dropped " + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    lines += [f"  {e['where']}: {e['reason']}" for e in report["errors"][:5]]
    lines += [f"  {line}" for line in report.get("dropped_at_tokenize", [])[:5]]
    return lines
