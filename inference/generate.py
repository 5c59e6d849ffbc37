"""The one greedy generation: what evaluation, the gate, the demos and the hf engine answer with.

Every reply is decoded by `decode` (left padding, a KV cache, the runtime's autocast, ranks in
lockstep) and ends by `finish_reason` (a stop token from `stop_token_ids`, or the length limit).
`greedy_generate` is the offline entry point; the hf engine (inference/engine.py) runs `decode`
with its own per-row sampling, so its temperature-0 rows are the tokens `greedy_generate` gives
for the same prompt and adapter. The pipeline's canary compares exactly those two answers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from inference.runtime import Runtime

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Reply:
    token_ids: list[int]  # generated, the stop token included
    text: str  # the generated text, without the stop token and special tokens
    finish_reason: FinishReason


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end a reply: the generation config's EOS ids (a chat model's end of turn
    among them) and the tokenizer's EOS, the ones vLLM stops at too."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos]
    return {i for i in [*eos, tokenizer.eos_token_id] if i is not None}


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def finish_reason(tokens: list[int], stop_ids: set[int], max_tokens: int) -> FinishReason | None:
    """Why a reply ends with its latest token: a stop token, or max_tokens reached; None: it
    goes on."""
    if tokens[-1] in stop_ids:
        return "stop"
    if len(tokens) >= max_tokens:
        return "length"
    return None


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """A conversation's token ids, rendered by the chat template up to the assistant's turn."""
    text = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    # The template writes the special tokens (BOS) itself.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's most likely next token."""
    return logits.argmax(dim=-1)


def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    batch_size: int,
    rt: Runtime | None = None,
) -> list[Reply]:
    """Greedy replies to token-id prompts, batch_size rows at a time. `rt` (default: the
    model's device, fp32, one rank) gives the device, autocast and lockstep; in lockstep every
    rank must pass the same number of batches."""
    rt = rt or Runtime(next(model.parameters()).device)
    stops, pad_id = stop_token_ids(model, tokenizer), pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    replies: list[Reply] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            rows = _GreedyRows(len(batch), max_new_tokens, stops)
            decode(model, batch, max_new_tokens, greedy_tokens, rows.take, pad_id=pad_id, rt=rt)
            replies += rows.replies(tokenizer)
    finally:
        model.train(was_training)
    return replies


class _GreedyRows:
    """The tokens of a batch's replies so far, and which have ended."""

    def __init__(self, n: int, max_tokens: int, stop_ids: set[int]):
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.reasons: list[FinishReason | None] = [None] * n
        self.max_tokens, self.stop_ids = max_tokens, stop_ids

    def take(self, chosen: list[int]) -> list[bool]:
        for i, token in enumerate(chosen):
            if self.reasons[i] is None:
                self.tokens[i].append(token)
                self.reasons[i] = finish_reason(self.tokens[i], self.stop_ids, self.max_tokens)
        return [r is not None for r in self.reasons]

    def replies(self, tokenizer) -> list[Reply]:
        out = []
        for tokens, reason in zip(self.tokens, self.reasons, strict=True):
            text_ids = tokens[:-1] if reason == "stop" else tokens
            text = tokenizer.decode(text_ids, skip_special_tokens=True)
            out.append(Reply(tokens, text, reason or "length"))
        return out


@torch.no_grad()
def decode(
    model,
    prompts: Sequence[Sequence[int]],
    max_steps: int,
    choose: Callable[[torch.Tensor], torch.Tensor],
    take: Callable[[list[int]], list[bool]],
    *,
    pad_id: int,
    rt: Runtime,
) -> None:
    """Up to max_steps decoding steps over the left-padded prompts, with a KV cache: each step
    `choose` turns every row's next-token logits into a token, and `take` records them and says
    which rows are done. Done rows ride along on padding until every row (in lockstep: on every
    rank) is done."""
    input_ids, attention = left_padded(prompts, pad_id, rt.device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    forward = _forward(model, rt)
    out = forward(input_ids, attention, positions, None)
    for _ in range(max_steps):
        chosen = choose(out.logits[:, -1, :]).tolist()
        done = take(chosen)
        if _everyone_done(all(done), rt):
            break
        feed = [pad_id if d else t for d, t in zip(done, chosen, strict=True)]
        next_ids = torch.tensor(feed, device=rt.device)[:, None]
        attention = torch.cat([attention, attention.new_ones((len(feed), 1))], dim=1)
        positions = positions[:, -1:] + 1
        out = forward(next_ids, attention, positions, out.past_key_values)


def left_padded(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), prompts aligned on the right: every row's next token is at
    column -1."""
    n, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[i, width - len(ids) :] = 1
    return input_ids.to(device), attention.to(device)


def _forward(model, rt: Runtime):
    # Only the last position's logits are read: without logits_to_keep the prefill would hold
    # [rows, prompt tokens, vocabulary] logits.
    bare = model.get_base_model() if hasattr(model, "get_base_model") else model
    extra = {"logits_to_keep": 1} if _accepts(bare, "logits_to_keep") else {}

    def forward(input_ids, attention_mask, position_ids, past):
        with rt.autocast():
            return model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past,
                use_cache=True,
                **extra,
            )

    return forward


def _accepts(model, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


def _everyone_done(mine: bool, rt: Runtime) -> bool:
    """Sharded weights make every forward pass collective: a rank whose rows are done keeps
    joining the others' passes until all ranks are done."""
    if not rt.lockstep:
        return mine
    return rt.sum_over_ranks([0.0 if mine else 1.0])[0] == 0
