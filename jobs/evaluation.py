"""Held-out evaluation: token-weighted loss and generated-answer exact match, over all ranks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from jobs.data import IGNORE_INDEX, collate, prompt_and_answer
from jobs.distributed import all_reduce_sum, rank_and_world


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over label positions, and how many there were."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((labels != IGNORE_INDEX).sum())


@torch.no_grad()
def eval_loss(model, examples, batch_size: int, pad_id: int, device, autocast) -> float:
    """Mean loss per label token over the whole held-out set, each rank taking its share."""
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    mine = examples[rank::world]
    for i in range(0, len(mine), batch_size):
        batch = {k: v.to(device) for k, v in collate(mine[i : i + batch_size], pad_id).items()}
        with autocast():
            loss, n = token_loss_sum(model, batch)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    total, count = all_reduce_sum([total, count], device)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def exact_match(
    model, tokenizer, conversations, max_new_tokens: int, batch_size: int, device, autocast
) -> float:
    """Share of held-out prompts whose greedy answer equals the reference (whitespace-stripped)."""
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = (
        tokenizer.padding_side,
        "left",
    )  # generate from the right edge
    correct, total = 0, 0
    mine = conversations[rank::world]
    for i in range(0, len(mine), batch_size):
        prompts, answers = zip(
            *(prompt_and_answer(c) for c in mine[i : i + batch_size]), strict=True
        )
        texts = [
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            device
        )
        with autocast():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        replies = tokenizer.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        correct += sum(r.strip() == a.strip() for r, a in zip(replies, answers, strict=True))
        total += len(answers)
    tokenizer.padding_side = padding_side
    model.train(was_training)
    correct, total = all_reduce_sum([correct, total], device)
    return correct / max(total, 1)
