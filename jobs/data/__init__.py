"""The data pipeline: sources -> formats -> normalize -> render -> dedup/length/quality -> split.

sources.py   files (local, globs, s3://, saved datasets) and their rows with file:line
formats.py   rows in OpenAI/ShareGPT/Alpaca/prompt-completion/text formats -> messages, validated
normalize.py Unicode and whitespace normalization, the canonical text an example hashes as
render.py    the chat template's render, token ids, labels masked to the answer turns
dedup.py     exact and MinHash near-duplicate detection over numpy arrays
quality.py   heuristic and LLM-judge quality scores
prepare.py   the offline pipeline (`python -m jobs.prepare`): manifest, splits, dropped rows
pairs.py     preference pairs (DPO): TRL's formats -> prompt/chosen/rejected token ids
"""

from __future__ import annotations

from pathlib import Path

from jobs.config import JobConfig
from jobs.data.prepare import DROP_CODES, MALFORMED, PreparedData, prepare_data

DROP_COUNTS = {MALFORMED, *DROP_CODES.values()}


def load_for_job(cfg: JobConfig, tokenizer, workdir: str | Path) -> PreparedData:
    """What the job trains and evaluates on, for its objective: the prepared set (data.prepared),
    or one prepared now into `workdir` (its manifest and dropped rows then stay with the run)."""
    if cfg.train.method == "dpo":
        from jobs.data.pairs import prepare_pairs

        return prepare_pairs(cfg.data, tokenizer, cfg.run.seed)
    return prepare_data(cfg.data, tokenizer, cfg.run.seed, cfg.model.name_or_path, str(workdir))


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
