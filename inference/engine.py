"""Generation engines: one base model per replica, many LoRA adapters, mixed-adapter batches.

`Engine` is the small interface the app needs; `HFEngine` implements it with transformers on CPU
or one GPU, adapters applied per row by inference/lora.py, every batch decoded by
inference/generate.py's loop: a temperature-0 row is the reply offline evaluation gives. A vLLM
engine (`LoRARequest` per row) could back the same interface on GPUs.

Sampling: every row has its own temperature, top_p, seed and stop strings. A seeded row draws
from its own `torch.Generator`, so its tokens do not depend on which other rows share its batch
(up to floating-point differences in the logits of a padded batch).
"""

from __future__ import annotations

import json
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from inference.errors import AdapterIncompatible
from inference.generate import (
    chat_prompt_ids,
    decode,
    finish_reason,
    greedy_tokens,
    pad_token_id,
    stop_token_ids,
)
from inference.lora import MultiLora, split_lora_weights, unsupported_features
from inference.runtime import Runtime


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None  # an engine adapter key; None: the base model
    params: SamplingParams = field(default_factory=SamplingParams)
    # Called from the generating thread with each new piece of text (streaming).
    on_text: Callable[[str], None] | None = None
    # Set from another thread when nobody waits for the answer any more (a closed stream): the
    # row stops at its next token instead of running to max_tokens.
    cancelled: bool = False


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length", "cancelled"]
    token_ids: list[int] = field(default_factory=list)  # generated, the stop token included
    # The batch this row ran in: rows, and distinct adapters among them (set by the scheduler).
    batch_rows: int = 0
    batch_adapters: int = 0


@dataclass
class AdapterWeights:
    """A LoRA adapter read into CPU memory: what the cache keeps and the engine loads."""

    path: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]

    @property
    def rank(self) -> int:
        ranks = [
            int(self.config.get("r", 0)),
            *map(int, self.config.get("rank_pattern", {}).values()),
        ]
        return max(ranks)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict.values())


def read_adapter(path: str | Path) -> AdapterWeights:
    """Read a peft adapter directory (adapter_config.json + adapter_model.safetensors)."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise AdapterIncompatible(
            f"adapter directory {path.name!r} lacks adapter_config.json or "
            "adapter_model.safetensors (is it a peft LoRA adapter?)"
        )
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterIncompatible(
            f"adapter {path.name!r} is a {config.get('peft_type')} adapter; only LoRA is served"
        )
    return AdapterWeights(str(path), config, load_file(str(weights_file)))


class Engine(ABC):
    """What the serving app needs from a model runtime."""

    context_window: int

    @abstractmethod
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the base model's chat template."""

    @abstractmethod
    def encode_text(self, text: str) -> list[int]: ...

    @abstractmethod
    def check_adapter(self, adapter: AdapterWeights) -> None:
        """Raise AdapterIncompatible (a client error) when the adapter cannot run on this base."""

    @abstractmethod
    def load_adapter(self, key: str, adapter: AdapterWeights) -> None: ...

    @abstractmethod
    def unload_adapter(self, key: str) -> None: ...

    @abstractmethod
    def loaded_adapters(self) -> set[str]: ...

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One batch; each row may name a different loaded adapter (or None for the base)."""


def base_name(name_or_path: str) -> str:
    """The comparable identity of a base model: the last path component, lowercased, so that
    `org/Model-8B`, `/models/Model-8B` and `s3://bucket/Model-8B` all read `model-8b`."""
    return name_or_path.rstrip("/").rsplit("/", 1)[-1].lower()


def check_trained_on(config: dict, base_names: set[str], name: str) -> None:
    """AdapterIncompatible when adapter_config.json names a base other than those served (no
    check when base_names is empty or the adapter names none)."""
    trained_on = config.get("base_model_name_or_path")
    if base_names and trained_on and base_name(trained_on) not in base_names:
        raise AdapterIncompatible(
            f"adapter {name!r} was trained on base model {base_name(trained_on)!r}; this "
            f"server serves {sorted(base_names)[0]!r}"
        )


def context_window_of(model_config, tokenizer, override: int | None = None) -> int:
    """The longest prompt + completion: the smallest of the model's positions, the tokenizer's
    limit and the server's setting."""
    limits = [
        getattr(model_config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
        override,
    ]
    return min(int(x) for x in limits if x and x < 10**8)


class HFEngine(Engine):
    """transformers: the base model is loaded once; up to max_adapters adapters sit in slots."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_lora_rank: int = 64,
        max_adapters: int = 8,
        base_names: Sequence[str] = (),
        context_window: int | None = None,
    ):
        self.base = model.eval()
        self.tokenizer = tokenizer
        self.max_lora_rank = max_lora_rank
        # Names an adapter's base_model_name_or_path may carry; empty: do not compare names.
        self.base_names = {base_name(n) for n in base_names if n}
        self.device = next(model.parameters()).device
        self.runtime = Runtime(self.device)  # the model's own dtype, no autocast, one rank
        self._linear_shapes = {
            name: tuple(m.weight.shape)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
        self.lora = MultiLora(model, max_adapters)
        self.context_window = context_window_of(model.config, tokenizer, context_window)
        self.pad_id = pad_token_id(tokenizer)
        self.stop_ids = stop_token_ids(model, tokenizer)

    # --- prompts -----------------------------------------------------------------------------
    def encode_chat(self, messages):
        return chat_prompt_ids(self.tokenizer, messages)

    def encode_text(self, text):
        return self.tokenizer(text)["input_ids"]

    # --- adapters ----------------------------------------------------------------------------
    def check_adapter(self, adapter: AdapterWeights) -> None:
        self._checked_weights(adapter)

    def _checked_weights(self, adapter: AdapterWeights) -> dict[str, tuple]:
        name = Path(adapter.path).name
        check_trained_on(adapter.config, self.base_names, name)
        if adapter.rank > self.max_lora_rank:
            raise AdapterIncompatible(
                f"adapter {name!r} has LoRA rank {adapter.rank}, above this server's "
                f"max_lora_rank {self.max_lora_rank}"
            )
        unsupported = unsupported_features(adapter.config)
        if unsupported:
            raise AdapterIncompatible(
                f"adapter {name!r} uses {', '.join(unsupported)}, which this server does not serve"
            )
        weights = split_lora_weights(adapter.state_dict, name)
        for module, (a, b) in weights.items():
            shape = self._linear_shapes.get(module)
            if shape is None:
                raise AdapterIncompatible(
                    f"adapter {name!r} targets {module}, which is not a linear layer of "
                    "this base model: it was trained for another base"
                )
            out_features, in_features = shape
            if a.shape[1] != in_features or b.shape[0] != out_features or a.shape[0] != b.shape[1]:
                raise AdapterIncompatible(
                    f"adapter {name!r}: {module} has A {tuple(a.shape)}, B {tuple(b.shape)}, "
                    f"which do not fit {module} {shape} of this base model: it was trained for "
                    "another base"
                )
        return weights

    def load_adapter(self, key: str, adapter: AdapterWeights) -> None:
        weights = self._checked_weights(adapter)
        self.lora.load(key, adapter.config, weights, self.device)

    def unload_adapter(self, key: str) -> None:
        if key in self.lora.slot_of:
            self.lora.unload(key)

    def loaded_adapters(self) -> set[str]:
        return set(self.lora.slot_of)

    # --- generation --------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        for r in requests:
            if r.adapter is not None and r.adapter not in self.lora.slot_of:
                raise KeyError(f"adapter {r.adapter} is not loaded")
        rows = [_Row(r, self.tokenizer) for r in requests]
        self.lora.set_rows([r.adapter for r in requests], self.device)
        decode(
            self.base,
            [r.prompt_ids for r in requests],
            max(r.params.max_tokens for r in requests),
            lambda logits: self._choose_tokens(logits, rows),
            lambda chosen: self._take(rows, chosen),
            pad_id=self.pad_id,
            rt=self.runtime,
        )
        return [row.result() for row in rows]

    def _take(self, rows: list[_Row], chosen: list[int]) -> list[bool]:
        for row, token in zip(rows, chosen, strict=True):
            if row.done:
                continue
            if row.request.cancelled:
                row.cancel()
            else:
                row.add(token, self.stop_ids)
        return [row.done for row in rows]

    def _choose_tokens(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        chosen = greedy_tokens(logits)  # temperature 0: what offline greedy generation picks
        for i, row in enumerate(rows):
            p = row.request.params
            if row.done or p.temperature == 0:
                continue
            probs = torch.softmax(logits[i].float() / p.temperature, dim=-1)
            if p.top_p < 1.0:
                probs = _top_p_filter(probs, p.top_p)
            chosen[i] = torch.multinomial(probs, 1, generator=row.generator(logits.device))[0]
        return chosen


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs[before >= top_p] = 0.0
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


class _Row:
    """One request's decoding state: tokens so far, stop checks, streamed text."""

    def __init__(self, request: GenerationRequest, tokenizer):
        self.request = request
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already passed to on_text
        self.done = False
        self.finish_reason: Literal["stop", "length", "cancelled"] = "length"
        self._generator: torch.Generator | None = None

    def generator(self, device) -> torch.Generator:
        if self._generator is None:
            seed = self.request.params.seed
            self._generator = torch.Generator(device=device).manual_seed(
                seed if seed is not None else secrets.randbits(63)
            )
        return self._generator

    def add(self, token: int, stop_ids: set[int]) -> None:
        params = self.request.params
        self.tokens.append(token)
        reason = finish_reason(self.tokens, stop_ids, params.max_tokens)
        if reason == "stop":  # a stop token: the text so far, without it
            self._finish("stop")
            return
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for s in params.stop if (i := self.text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self._finish("stop")
        elif reason == "length":
            self._finish("length")
        else:
            self._stream(self._safe_length())

    def _safe_length(self) -> int:
        """How much text can be sent now: not a partial UTF-8 character, nor a tail that may yet
        become a stop string."""
        text = self.text.rstrip("\ufffd")
        hold = 0
        for s in self.request.params.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return len(text) - hold

    def _stream(self, upto: int) -> None:
        if self.request.on_text is not None and upto > self.sent:
            self.request.on_text(self.text[self.sent : upto])
            self.sent = upto

    def cancel(self) -> None:
        self.done = True
        self.finish_reason = "cancelled"

    def _finish(self, reason: Literal["stop", "length"]) -> None:
        self.done = True
        self.finish_reason = reason
        self._stream(len(self.text))

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=len(self.tokens),
            finish_reason=self.finish_reason,
            token_ids=list(self.tokens),
        )
