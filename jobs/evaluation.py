"""Held-out evaluation: token-weighted loss and generated-answer exact match, over all ranks."""

from __future__ import annotations

import math

import torch

from inference.generate import chat_prompt_ids, greedy_generate
from inference.runtime import Runtime
from jobs.batching import collate
from jobs.data.render import IGNORE_INDEX, prompt_and_answer
from jobs.logits import cross_entropy, last_hidden_states, scores_at


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over label positions, and how many there were (the
    logits computed chunk by chunk at those positions only: jobs/logits.py)."""
    if "position_ids" in batch:  # packed rows: the position-id resets separate the examples
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    hidden, head = last_hidden_states(model, **inputs)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    (loss,) = scores_at(head, hidden[:, :-1], labels, mask, cross_entropy)
    return loss.sum(), int(mask.sum())


def rank_batches(items: list, batch_size: int, rt: Runtime) -> list[list | None]:
    """This rank's share of `items` in batches. In lockstep (sharded parameters: every forward
    pass is collective) every rank gets the same number of batches; None marks a pass a rank
    makes only to keep the others company."""
    mine = items[rt.rank :: rt.world]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    if rt.lockstep:
        most = math.ceil(math.ceil(len(items) / rt.world) / batch_size)
        batches += [None] * (most - len(batches))
    return batches


@torch.no_grad()
def eval_loss(model, examples, batch_size: int, pad_id: int, rt: Runtime) -> float:
    """Mean loss per label token over the whole held-out set, each rank taking its share."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in rank_batches(examples, batch_size, rt):
        batch = rt.to_device(collate(chunk or examples[:1], pad_id))
        with rt.autocast():
            loss, n = token_loss_sum(model, batch)
        if chunk is not None:
            total, count = total + loss.item(), count + n
    model.train(was_training)
    total, count = rt.sum_over_ranks([total, count])
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def exact_match(
    model, tokenizer, conversations, max_new_tokens: int, batch_size: int, rt: Runtime
) -> float:
    """Share of held-out prompts whose greedy answer equals the reference (whitespace-stripped)."""
    correct, total = 0, 0
    for chunk in rank_batches(conversations, batch_size, rt):
        prompts, answers = zip(
            *(prompt_and_answer(c) for c in chunk or conversations[:1]), strict=True
        )
        ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
        replies = greedy_generate(
            model, tokenizer, ids, max_new_tokens, batch_size=batch_size, rt=rt
        )
        if chunk is None:
            continue
        correct += sum(r.text.strip() == a.strip() for r, a in zip(replies, answers, strict=True))
        total += len(answers)
    correct, total = rt.sum_over_ranks([correct, total])
    return correct / max(total, 1)
