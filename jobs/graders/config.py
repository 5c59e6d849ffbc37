"""Grader configs in OpenAI's reinforcement-fine-tuning shapes (platform.openai.com/docs/guides/graders).

`GraderConfig` is a union on `type`, usable as a pydantic field type. Everything that can be checked
without grading is checked at load: template syntax, metric names, formula names, python source
syntax and whether a `function` module imports.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from jobs.graders.base import Section
from jobs.graders.formula import check_formula
from jobs.graders.sandbox import child_env
from jobs.graders.templates import Template

Name = Annotated[str, Field(min_length=1)]


class StringCheckConfig(Section):
    type: Literal["string_check"]
    name: Name
    input: Template
    reference: Template
    # like: the reference is a substring of the input; ilike: the same, ignoring case
    operation: Literal["eq", "ne", "like", "ilike"]


SIMILARITY_METRICS = (
    "fuzzy_match",
    "bleu",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
)
Metric = Literal[
    "fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"
]


def _supported_metric(value: Any) -> Any:
    # OpenAI also has gleu, meteor and cosine (the last needs an embedding model); say so plainly
    # instead of pydantic's generic "Input should be ..." for a name that is valid elsewhere.
    if isinstance(value, str) and value not in SIMILARITY_METRICS:
        known = "OpenAI's metric " if value in ("gleu", "meteor", "cosine") else ""
        raise ValueError(
            f"{known}'{value}' is not supported here; use one of {', '.join(SIMILARITY_METRICS)}"
        )
    return value


class TextSimilarityConfig(Section):
    type: Literal["text_similarity"]
    name: Name
    input: Template
    reference: Template
    evaluation_metric: Annotated[Metric, BeforeValidator(_supported_metric)]
    # Only decides Grade.passed; the score is the metric itself, as in OpenAI's grader.
    pass_threshold: float | None = Field(None, ge=0, le=1)


def _has_grade_function(source: str) -> str:
    try:
        tree = ast.parse(source, "<python grader source>")
    except SyntaxError as e:
        raise ValueError(f"syntax error on line {e.lineno}: {e.msg}") from None
    if not any(isinstance(n, ast.FunctionDef) and n.name == "grade" for n in tree.body):
        raise ValueError("define a top-level `def grade(sample, item) -> float`")
    return source


_IMPORT_CHECK = """
import importlib, sys
fn = getattr(importlib.import_module(sys.argv[1]), sys.argv[2], None)
if not callable(fn):
    sys.exit(f"module {sys.argv[1]} has no function {sys.argv[2]}")
"""


def _importable_function(spec: str) -> str:
    """Import the module in a child (user code never runs in the trainer), from the working directory."""
    module, _, function = spec.partition(":")
    if not re.fullmatch(r"[A-Za-z_][\w.]*", module) or not function.isidentifier():
        raise ValueError(f"'{spec}': give module:function, e.g. my_rewards:grade")
    try:
        done = subprocess.run(
            [sys.executable, "-c", _IMPORT_CHECK, module, function],
            cwd=os.getcwd(),
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        raise ValueError(f"importing {module} took over 120 s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise ValueError(f"cannot import {spec} from {os.getcwd()} or PYTHONPATH: {last}")
    return spec


class PythonConfig(Section):
    type: Literal["python"]
    name: Name
    source: str | None = None  # OpenAI's shape: code defining grade(sample, item)
    # Ours: a function in your code, module:function, importable from the working directory or PYTHONPATH
    function: str | None = None
    timeout_s: float = Field(10.0, gt=0)  # per sample; the child is killed and restarted past it
    memory_mb: int = Field(512, ge=64)  # the child's address-space limit (RLIMIT_AS)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        return None if v is None else _has_grade_function(v)

    @field_validator("function")
    @classmethod
    def _function(cls, v: str | None) -> str | None:
        return None if v is None else _importable_function(v)

    @model_validator(mode="before")
    @classmethod
    def _one_of(cls, raw: Any) -> Any:
        # Before the fields: with both given, this is the error to report, not an import failure.
        if isinstance(raw, dict) and (raw.get("source") is None) == (raw.get("function") is None):
            raise ValueError(
                "give exactly one of source (code defining grade) or function (module:function)"
            )
        return raw


class Message(Section):
    role: Literal["system", "developer", "user", "assistant"]
    content: Template


class SamplingParams(Section):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None


def _env_var_name(v: str | None) -> str | None:
    # The message never repeats the value: a key pasted here by mistake must not reach the logs.
    if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
        raise ValueError(
            "give the NAME of the environment variable that holds the key, not the key"
        )
    return v


class ScoreModelConfig(Section):
    type: Literal["score_model"]
    name: Name
    model: str = Field(min_length=1)
    input: list[Message] = Field(min_length=1)
    range: tuple[float, float] = (0.0, 1.0)  # the reply's score is clamped into it
    sampling_params: SamplingParams = SamplingParams()
    base_url: str | None = None  # any OpenAI-compatible endpoint; None: OpenAI's API
    # The key is read from this variable at call time and never stored; None: send no key.
    api_key_env: Annotated[str | None, BeforeValidator(_env_var_name)] = "OPENAI_API_KEY"
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(2, ge=0)
    max_concurrency: int = Field(8, ge=1, le=256)

    @field_validator("range")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError(f"give [min, max] with min < max, got {list(v)}")
        return v


class MultiConfig(Section):
    type: Literal["multi"]
    name: Name
    # The keys are the names calculate_output uses (so they must be identifiers).
    graders: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], GraderConfig] = Field(
        min_length=1
    )
    calculate_output: str = Field(min_length=1)  # e.g. "0.5 * a + 0.5 * b"; min, max, abs, round

    @field_validator("calculate_output")
    @classmethod
    def _formula(cls, v: str, info: ValidationInfo) -> str:
        if "graders" in info.data:  # else the graders' own errors are reported
            check_formula(v, list(info.data["graders"]))
        return v


GraderConfig = Annotated[
    StringCheckConfig | TextSimilarityConfig | PythonConfig | ScoreModelConfig | MultiConfig,
    Field(discriminator="type"),
]
MultiConfig.model_rebuild()
