"""OpenAI model ids of fine-tuned models and their names in the adapter registry: the one place
that maps between them.

    ft:BASE:TENANT:SUFFIX:ID                 the job's model      -> registry ftjob-ID (production)
    ft:BASE:TENANT:SUFFIX:ID:ckpt-step-N     one of its checkpoints -> registry ftjob-ID@step-N

The registry's names may not hold ':' (tune/registry/store.py); the job id is unique, so the
registry name is the job id and the rest of the OpenAI id is the job's record. Names starting
with `ftjob-` are reserved: the gateway serves them only through their ft: id, to their owner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "ft:"
RESERVED = "ftjob-"
_JOB_ID = re.compile(r"ftjob-([0-9a-f]{24})")
_CKPT = re.compile(r"ckpt-step-(\d{1,9})")


@dataclass(frozen=True)
class FineTunedId:
    job_id: str
    registry_name: str  # ftjob-...
    selector: str | None  # None: the production alias; step-N: a checkpoint's alias


def is_fine_tuned(model: str) -> bool:
    return isinstance(model, str) and model.startswith(PREFIX)


def is_reserved(name: str) -> bool:
    return name.startswith(RESERVED)


def model_id(base: str, tenant: str, suffix: str | None, job_id: str) -> str:
    return f"{PREFIX}{base}:{tenant}:{suffix or ''}:{_JOB_ID.fullmatch(job_id).group(1)}"


def checkpoint_model_id(job_model_id: str, step: int) -> str:
    return f"{job_model_id}:ckpt-step-{step}"


def checkpoint_alias(step: int) -> str:
    return f"step-{step}"


def parse(model: str) -> FineTunedId | None:
    """The registry name and alias of an ft: id; None when it is not one of ours."""
    if not is_fine_tuned(model) or len(model) > 512:
        return None
    parts = model.split(":")
    selector = None
    if len(parts) == 6 and (m := _CKPT.fullmatch(parts[5])):
        selector, parts = checkpoint_alias(int(m.group(1))), parts[:5]
    if len(parts) != 5 or not re.fullmatch(r"[0-9a-f]{24}", parts[4]):
        return None
    job_id = RESERVED + parts[4]
    return FineTunedId(job_id, job_id, selector)
