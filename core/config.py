"""Config machinery every layer shares: typed sections, YAML files, dotted overrides, errors that name the field.

A config is a pydantic model of `Section`s, validated when loaded: an error names the file and the
dotted field, and suggests the closest known key for a misspelling. The schemas themselves live with
their owners (jobs/config.py: the job; tune/, serve/: theirs).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` strings to a {"a.b": 1} dict; values are parsed as YAML (numbers, bools, lists, null)."""
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or key != key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        quoted = raw.lstrip()[:1] in ("'", '"')  # model.revision='1234e56' stays a string
        parsed[key] = value if quoted else _yaml11_float(value)
    return parsed


def _yaml11_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; on a command line it means a number."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        return float(value)
    return value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for i, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise ConfigError(f"override {dotted}: {where} is a value, not a section")
            node = child
        node[leaf] = value
    return raw


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        for candidate in getattr(ann, "__args__", (ann,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                keys += _known_keys(candidate, prefix + name + ".")
    return keys


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc, _known_keys(model), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key '{loc}'{hint}"
    if error["type"] == "missing":
        return f"{loc}: required field is missing"
    msg = error["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def validate(model: type[Model], raw: dict[str, Any], source: str = "<config>") -> Model:
    """Validate any config model; the error names the source and every bad dotted field."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err, model) for err in e.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's top-level mapping; missing files and bad YAML are ConfigErrors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw
