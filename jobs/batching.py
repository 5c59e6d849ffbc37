"""Batches for the training loop: the epoch order, each rank's micro-batches, padding and packing."""

from __future__ import annotations

import torch

from jobs.data.render import IGNORE_INDEX


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), for exact
    resume. A tensor: 8 bytes an example where a list of ints takes ~36 (a worker holds it)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def step_micro_batches(
    order: list[int] | torch.Tensor,
    step_in_epoch: int,
    effective: int,
    rank: int,
    world: int,
    micro: int,
):
    """This rank's micro-batches (lists of example indices) for one optimizer step.

    A step always takes the same `effective` examples from the epoch order, split evenly over the
    ranks and then into micro-batches: the worker count and micro-batch size change how a step
    is computed, never which examples it sees.
    """
    step = order[step_in_epoch * effective : (step_in_epoch + 1) * effective]
    if isinstance(step, torch.Tensor):  # an epoch_permutation
        step = step.tolist()
    per_rank = effective // world
    mine = step[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + micro] for i in range(0, per_rank, micro)]


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack(
    examples: list[dict[str, list[int]]], max_len: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Several examples per row, so that rows carry tokens instead of padding.

    First-fit decreasing into rows of `max_len` tokens. Each example's position ids restart at
    0: transformers turns those resets into a block-diagonal causal mask (sdpa, eager) or
    variable-length attention (flash-attention 2), so no example attends to another, and the
    first label of each example is dropped, since in a row of its own nothing predicts it. The
    step's loss is the same as with `collate`; only the padding is gone. `attention_mask` marks
    the real tokens for counting; it must not reach the model, which would then ignore the
    position-id resets.
    """
    rows: list[list[dict]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True):
        n = len(e["input_ids"])
        i = next((i for i, free in enumerate(room) if free >= n), None)
        if i is None:
            rows.append([]), room.append(max_len)
            i = len(rows) - 1
        rows[i].append(e)
        room[i] -= n
    width = max(max_len - free for free in room)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            ids[r, at : at + n] = torch.tensor(e["input_ids"])
            labels[r, at + 1 : at + n] = torch.tensor(e["labels"][1:])
            positions[r, at : at + n] = torch.arange(n)
            mask[r, at : at + n] = 1
            at += n
        positions[r, at:] = torch.arange(width - at)  # the tail's padding is a block of its own
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}


def collate_pairs(pairs: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """TRL's layout (DataCollatorForPreference): the chosen rows, then the rejected rows, each
    prompt + answer, right-padded; completion_mask marks the answer tokens."""
    rows = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
    rows += [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        ids[r, :n] = torch.tensor(prompt + answer)
        attention[r, :n] = 1
        completion[r, len(prompt) : n] = 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
