"""Held-out evaluation: token-weighted loss and generated-answer exact match, over all ranks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from inference.runtime import Runtime
from jobs.batching import collate
from jobs.data.render import IGNORE_INDEX, prompt_and_answer


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over label positions, and how many there were."""
    if "position_ids" in batch:  # packed rows: the position-id resets separate the examples
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((labels != IGNORE_INDEX).sum())


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


@torch.no_grad()
def exact_match(
    model, tokenizer, conversations, max_new_tokens: int, batch_size: int, rt: Runtime
) -> float:
    """Share of held-out prompts whose greedy answer equals the reference (whitespace-stripped)."""
    was_training = model.training
    model.eval()
    # generate from the right edge
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    correct, total = 0, 0
    for chunk in rank_batches(conversations, batch_size, rt):
        prompts, answers = zip(
            *(prompt_and_answer(c) for c in chunk or conversations[:1]), strict=True
        )
        texts = [
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(rt.device)
        with rt.autocast():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                # sharded weights: a rank that finishes early keeps joining the others' passes
                synced_gpus=rt.lockstep,
            )
        if chunk is None:
            continue
        replies = tokenizer.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        correct += sum(r.strip() == a.strip() for r, a in zip(replies, answers, strict=True))
        total += len(answers)
    tokenizer.padding_side = padding_side
    model.train(was_training)
    correct, total = rt.sum_over_ranks([correct, total])
    return correct / max(total, 1)
