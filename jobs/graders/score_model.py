"""score_model: a model behind any OpenAI-compatible endpoint scores each sample.

The API key is read from the environment (config.api_key_env) for each grade() call and lives only
in that call's client; the config, the grader and its errors never hold it.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jinja2
import openai

from jobs.graders.base import Grade, Grader, failed, finite, short
from jobs.graders.config import ScoreModelConfig
from jobs.graders.templates import render

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def parse_score(reply: str) -> float:
    """A score from a reply: {"score": x} (possibly inside other text or a code fence) or a bare number."""
    text = reply.strip()
    found = re.search(r"\{.*\}", text, re.DOTALL)
    if found:
        try:
            value = json.loads(found.group())
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and "score" in value:
            return finite(value["score"])
    if _NUMBER.fullmatch(text):
        return float(text)
    raise ValueError(f'the reply has no {{"score": x}}: {text[:80]!r}')


def _instruction(low: float, high: float) -> str:
    return f'Reply with only a JSON object {{"score": x}}, where x is a number from {low:g} to {high:g}.'


def build_messages(config: ScoreModelConfig, sample: dict[str, Any]) -> list[dict[str, str]]:
    """The config's messages rendered for the sample, with the reply format asked for in the system
    message (added first when there is none: some chat templates allow a system message only there)."""
    messages = [{"role": m.role, "content": render(m.content, sample)} for m in config.input]
    ask = _instruction(*config.range)
    if messages[0]["role"] in ("system", "developer"):
        messages[0]["content"] += "\n\n" + ask
    else:
        messages.insert(0, {"role": "system", "content": ask})
    return messages


class ScoreModelGrader(Grader):
    config: ScoreModelConfig

    def grade(self, samples: list[dict[str, Any]]) -> list[Grade]:
        key = self._key()
        if isinstance(key, Grade):
            return [key] * len(samples)
        client = self._client(key)
        try:
            workers = min(self.config.max_concurrency, max(1, len(samples)))
            with ThreadPoolExecutor(workers, thread_name_prefix=f"grader-{self.name}") as pool:
                return list(pool.map(lambda s: self._one(client, key, s), samples))
        finally:
            client.close()

    def _key(self) -> str | None | Grade:
        """The key from the environment now, or the Grade every sample gets when it is not set."""
        env = self.config.api_key_env
        if env is None:
            return None
        key = os.environ.get(env)
        return (
            key
            if key
            else failed(self.name, f"environment variable {env} (api_key_env) is not set")
        )

    def _client(self, key: str | None) -> openai.OpenAI:
        # No key: a placeholder, for local servers that take none (the client insists on one).
        return openai.OpenAI(
            api_key=key or "no-key",
            base_url=self.config.base_url,
            timeout=self.config.timeout_s,
            max_retries=self.config.max_retries,
        )

    def _one(self, client: openai.OpenAI, key: str | None, sample: dict[str, Any]) -> Grade:
        try:
            messages = build_messages(self.config, sample)
            reply = client.chat.completions.create(
                model=self.config.model,
                messages=messages,
                **self.config.sampling_params.model_dump(exclude_none=True),
            )
            score = parse_score(reply.choices[0].message.content or "")
        except (jinja2.TemplateError, openai.OpenAIError, ValueError, IndexError, TypeError) as e:
            return failed(self.name, short(_redact(f"{type(e).__name__}: {e}", key)))
        low, high = self.config.range
        score = min(high, max(low, score))
        return Grade(score, scores={self.name: score})


def _redact(message: str, key: str | None) -> str:
    # An endpoint may echo the request's credentials in its error body.
    return message.replace(key, "***") if key else message
