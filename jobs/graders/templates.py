"""Jinja templates over `sample` and `item`, as in OpenAI's graders: {{ sample.output_text }}, {{ item.answer }}."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment
from pydantic import AfterValidator

# Sandboxed: templates come from config files, and a template must not reach Python internals.
# StrictUndefined: a misspelt field is an error for that sample, not an empty string that scores.
_ENV = SandboxedEnvironment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
)


@lru_cache(maxsize=256)
def _compiled(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def _check_syntax(source: str) -> str:
    try:
        _compiled(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"template syntax error on line {e.lineno}: {e.message}") from None
    return source


Template = Annotated[str, AfterValidator(_check_syntax)]  # checked when the config is loaded


def context(sample: dict[str, Any]) -> dict[str, Any]:
    """The names a template (and a python grader) sees: the sample without its item, and the item."""
    return {
        "sample": {k: v for k, v in sample.items() if k != "item"},
        "item": sample.get("item") or {},
    }


def render(source: str, sample: dict[str, Any]) -> str:
    """Raises jinja2.TemplateError (e.g. UndefinedError) for a field the sample lacks."""
    return _compiled(source).render(context(sample))
