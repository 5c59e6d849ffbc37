"""The `model` field of a request: NAME, NAME@VERSION or NAME@ALIAS, validated before any lookup.

Validation is purely textual, by the registry's own rules (core/registry.py), so that a bad name
(path traversal, odd characters, too long) is rejected before the filesystem or object store is
touched, and every version the registry writes is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

from core import registry as contract
from serve.errors import InvalidModelName

MAX_MODEL_FIELD = contract.NAME_MAX + 1 + max(contract.NAME_MAX, contract.VERSION_LEN)


@dataclass(frozen=True)
class ModelName:
    name: str
    selector: str | None  # a version or an alias; None: the default alias, else the newest version

    def __str__(self) -> str:
        return self.name if self.selector is None else f"{self.name}@{self.selector}"


def is_valid_name(name: str) -> bool:
    return contract.is_name(name)


def parse_model_name(model: str) -> ModelName:
    """Split and validate a request's `model`; raises InvalidModelName (400) with the reason."""
    if not isinstance(model, str) or not model:
        raise InvalidModelName("'model' must be a non-empty string", param="model")
    if len(model) > MAX_MODEL_FIELD:
        raise InvalidModelName(
            f"'model' is longer than {MAX_MODEL_FIELD} characters", param="model"
        )
    name, sep, selector = model.partition("@")
    if not is_valid_name(name):
        raise InvalidModelName(
            f"'model' must be NAME, NAME@VERSION or NAME@ALIAS where NAME is {contract.NAME_RULE}",
            param="model",
        )
    if not sep:
        return ModelName(name, None)
    if not (contract.is_version(selector) or contract.is_name(selector)):
        raise InvalidModelName(
            f"the part after '@' must be a version ({contract.VERSION_RULE}) or an alias name "
            f"({contract.NAME_RULE})",
            param="model",
        )
    return ModelName(name, selector)
