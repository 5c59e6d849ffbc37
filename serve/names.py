"""The `model` field of a request: NAME, NAME@VERSION or NAME@ALIAS, validated before any lookup.

Validation is purely textual so that a bad name (path traversal, odd characters, too long) is
rejected before the filesystem or object store is touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from serve.errors import InvalidModelName

NAME_RE = re.compile(r"[a-z0-9][a-z0-9\-_.]{0,62}")
VERSION_RE = re.compile(r"[a-z0-9]{1,64}")
DEFAULT_ALIAS = "production"
MAX_MODEL_FIELD = 128  # NAME (63) + "@" + VERSION (64)


@dataclass(frozen=True)
class ModelName:
    name: str
    selector: str | None  # a version or an alias; None: production alias, else the newest version

    def __str__(self) -> str:
        return self.name if self.selector is None else f"{self.name}@{self.selector}"


def is_valid_name(name: str) -> bool:
    # ".." and "." match the character class; as path components they would leave the registry.
    return bool(NAME_RE.fullmatch(name)) and name not in (".", "..") and ".." not in name


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
            "'model' must be NAME, NAME@VERSION or NAME@ALIAS where NAME is lowercase letters, "
            "digits, '-', '_' or '.' (at most 63 characters, no '..')",
            param="model",
        )
    if not sep:
        return ModelName(name, None)
    if not (VERSION_RE.fullmatch(selector) or is_valid_name(selector)):
        raise InvalidModelName(
            "the part after '@' must be a version (lowercase hex/alphanumerics) or an alias name",
            param="model",
        )
    return ModelName(name, selector)
