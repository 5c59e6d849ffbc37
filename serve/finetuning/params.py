"""A fine-tuning job request -> the JobConfig its Ray job trains with.

Everything the request does not set comes from the base model's job YAML (settings
base_models.NAME.job); "auto" means that YAML's value. The resolved values go back to the client
in the job's `method`, as OpenAI reports them.
"""

from __future__ import annotations

import copy
import secrets
from pathlib import Path
from typing import Any

from core import storage
from core.config import ConfigError, apply_overrides, read_yaml
from jobs.config import JobConfig, validate_config
from serve.errors import InvalidRequest
from serve.finetuning.config import (
    REPO,
    BaseModelEntry,
    DpoMethod,
    JobRequest,
    SupervisedHyperparameters,
    SupervisedMethod,
)


def local_path(path: str) -> str:
    """A relative path from the working directory, else from this checkout (the Serve replica's
    working directory is Ray's, not the one `serve run` started in)."""
    if storage.is_remote(path) or Path(path).is_absolute():
        return path
    here = Path(path).expanduser()
    return str(here.resolve() if here.exists() else (REPO / path).resolve())


def template(entry: BaseModelEntry) -> dict[str, Any]:
    raw = apply_overrides(read_yaml(local_path(entry.job)), copy.deepcopy(entry.overrides))
    model = raw.get("model", {}).get("name_or_path")
    if model and not storage.is_remote(model) and (REPO / model).exists():
        raw["model"]["name_or_path"] = local_path(model)
    return raw


def method_of(req: JobRequest) -> tuple[str, SupervisedHyperparameters]:
    """(supervised | dpo | reinforcement, its hyperparameters); conflicting fields are 400s."""
    if req.method is not None and req.hyperparameters is not None:
        raise InvalidRequest(
            "give hyperparameters under method.supervised.hyperparameters or the deprecated "
            "top-level hyperparameters, not both",
            param="hyperparameters",
        )
    if req.method is None:
        return "supervised", req.hyperparameters or SupervisedHyperparameters()
    kind = req.method.type
    for other in METHODS:
        if other != kind and getattr(req.method, other) is not None:
            raise InvalidRequest(
                f"method.type is '{kind}': give method.{kind}, not another method's section",
                param=f"method.{other}",
            )
    section = getattr(req.method, kind)
    if section is None and kind == "reinforcement":
        raise InvalidRequest(
            "method.type 'reinforcement' needs method.reinforcement.grader",
            param="method.reinforcement.grader",
        )
    if section is None:
        section = DpoMethod() if kind == "dpo" else SupervisedMethod()
    return kind, section.hyperparameters


def refuse_server_code(grader: Any, where: str) -> None:
    """A tenant's python grader brings its code as `source`; `function` (a module of the
    server's own import path) is for job YAMLs written by the cluster's owner."""
    if not isinstance(grader, dict):
        return
    if grader.get("type") == "python" and grader.get("function") is not None:
        raise InvalidRequest(
            "a python grader sent to the API gives its code as `source`; `function` imports "
            "a module of the server's and is refused",
            param=f"{where}.function",
        )
    for name, sub in (grader.get("graders") or {}).items():
        refuse_server_code(sub, f"{where}.graders.{name}")


METHODS = ("supervised", "dpo", "reinforcement")
TRAIN_METHOD = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}


def overrides(req: JobRequest, kind: str, hp, raw: dict, job_id: str, seed: int) -> dict:
    """The dotted keys the request sets on the template."""
    train = raw.get("train", {})
    out: dict[str, Any] = {
        "run.name": job_id,
        "run.seed": seed,
        "train.method": TRAIN_METHOD[kind],
        "tracking.backend": "none",
    }
    if hp.n_epochs != "auto":
        out["train.epochs"] = hp.n_epochs
    if hp.batch_size != "auto":
        micro = int(train.get("micro_batch_size", 4))
        out["train.effective_batch_size"] = hp.batch_size
        out["train.micro_batch_size"] = micro if hp.batch_size % micro == 0 else hp.batch_size
    if hp.learning_rate_multiplier != "auto":
        out["train.lr"] = float(train.get("lr", 2e-4)) * hp.learning_rate_multiplier
    if kind == "dpo" and hp.beta != "auto":
        out["train.dpo.beta"] = hp.beta
    if kind == "reinforcement":
        refuse_server_code(req.method.reinforcement.grader, "method.reinforcement.grader")
        # GRPO on the prompts, the template's train.grpo settings (if any) under OpenAI's grader
        out["train.grpo"] = {**train.get("grpo", {}), "grader": req.method.reinforcement.grader}
        if hp.eval_interval != "auto":
            out["eval.every_steps"] = hp.eval_interval
    ext = req.rayft
    for key, value in (
        ("lora.r", ext.lora_rank),
        ("lora.alpha", ext.lora_alpha),
        ("train.max_steps", ext.max_steps),
        ("checkpoint.every_steps", ext.checkpoint_every_steps),
        ("eval.every_steps", ext.eval_every_steps),
    ):
        if value is not None:
            out[key] = value
    return out


def pairs_uri(runs: str, job_id: str, split: str) -> str:
    """Where a dpo job's rows go once validated, in the pair format jobs/data/pairs.py reads."""
    return storage.join(runs, f"{job_id}-input", f"{split}.jsonl")


def build_job_config(
    req: JobRequest,
    entry: BaseModelEntry,
    job_id: str,
    runs: str,
    train_uri: str,
    eval_uri: str | None,
) -> tuple[JobConfig, dict[str, Any], int]:
    """(the JobConfig, OpenAI's `method` with every "auto" resolved, the seed)."""
    kind, hp = method_of(req)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    raw = template(entry)
    sets = overrides(req, kind, hp, raw, job_id, seed)
    sets["checkpoint.storage_path"] = runs
    if kind == "dpo":  # the runner writes the validated rows there
        train_uri = pairs_uri(runs, job_id, "train")
        eval_uri = pairs_uri(runs, job_id, "eval") if eval_uri else None
    sets["data.train_files"] = [train_uri]
    if eval_uri is not None:
        sets["data.eval_files"] = [eval_uri]
        sets["data.eval_fraction"] = 0.0
    try:
        cfg = validate_config(apply_overrides(raw, sets), f"base model {req.model!r}")
    except ConfigError as e:
        raise InvalidRequest(f"these hyperparameters cannot train: {e}", param="method") from None
    return cfg, resolved_method(kind, cfg, hp), seed


def resolved_method(kind: str, cfg: JobConfig, asked) -> dict[str, Any]:
    multiplier = asked.learning_rate_multiplier
    hp: dict[str, Any] = {
        "n_epochs": cfg.train.epochs,
        "batch_size": cfg.train.effective_batch_size,
        "learning_rate_multiplier": 1.0 if multiplier == "auto" else multiplier,
    }
    if kind == "dpo":
        hp["beta"] = cfg.train.dpo.beta
    if kind == "reinforcement":
        hp["eval_interval"] = cfg.eval.every_steps or cfg.train.max_steps or hp["n_epochs"]
        grader = cfg.train.grpo.grader.model_dump(mode="json", exclude_none=True)
        return {"type": kind, kind: {"grader": grader, "hyperparameters": hp}}
    return {"type": kind, kind: {"hyperparameters": hp}}
